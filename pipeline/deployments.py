"""The Prefect deployments, served by `python -m pipeline serve` from the checkout (keep it running;
`prefect deployment run download/cc12m`, `pseudo-label/cc12m`, `train-tokenizers/cc12m` or `tokenize/cc12m`
then hands it runs). Parameters can be
overridden per run with `--param`."""
from __future__ import annotations

from pipeline.flows import (cc12m_pipeline_flow, download_flow, pseudo_label_flow, tokenize_flow,
                            train_tokenizers_flow)


def deployments() -> list:
    return [
        download_flow.to_deployment(
            name="cc12m",
            parameters={"input": "data/cc12m.tsv", "output": "data/cc12m", "profile": "paper"},
            description="Download CC12M (url<TAB>caption) into webdataset shards.",
        ),
        pseudo_label_flow.to_deployment(
            name="cc12m",
            parameters={"profile": "demo"},  # the demo dataset by default; --param profile=paper data=...
            description="Pseudo-label every rgb shard: depth, normals, segmentation, boxes, CLIP maps.",
        ),
        train_tokenizers_flow.to_deployment(
            name="cc12m",
            parameters={"profile": "demo"},
            description="Train the text tokenizer and one VQ-VAE per dense modality (Ray Train).",
        ),
        tokenize_flow.to_deployment(
            name="cc12m",
            parameters={"profile": "demo"},
            description="Encode every sample's crops into tok_<modality>@224 shards with the trained tokenizers.",
        ),
        cc12m_pipeline_flow.to_deployment(
            name="cc12m",
            parameters={"input": "demo", "profile": "demo"},  # --param input=cc12m.tsv profile=paper data=...
            description="URLs to tokens: download, pseudo-label, train tokenizers, tokenize; resumes where it stopped.",
        ),
    ]


def serve() -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments())
