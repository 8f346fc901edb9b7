"""The bottom floor: configuration, the modality registry, the Ray runtime, pictures and file helpers.

Imports nothing from models/, stages/ or pipeline/.
"""
