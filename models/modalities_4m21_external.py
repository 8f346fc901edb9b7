"""4M-21's modalities whose labelers are not packaged (ImageBind; HMR2.0 for human poses), each one registry entry:
its stored format, its tokenizer and its 4M domain. An external tool writes one file per sample in that format,
named by the sample's key, and `python -m pipeline import-labels --modality imagebind --source DIR` brings them
in as the modality's label shards (checked by the entry, every sample's fate recorded).

Apart from the other 4M-21 modules so that a profile names this one only where such files exist: every stage's
defaults cover every modality a profile names (tokenizers, 4M's inputs and targets).
"""
from __future__ import annotations

import json

import numpy as np
import torch

from core import pictures
from core.registry import register
from models.modality_kinds import FeatureMapModality, GlobalFeatureModality, SequenceModality

BINS = 1000  # the reference's coord_bins


class ImageBind(FeatureMapModality):
    """ImageBind-H/14's patch features (1280-d), one per 14-pixel patch at 224: 16x16 tokens."""

    name, label_order, token_grid = "imagebind", 13, 16
    labelled_per_crop = False  # no labeler here to run on each crop: the stored map is cut, as a trained one's
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_ImageBind-H14_8k_224-448"
    # the reference's ImageBind-H14 tokenizer config: ViT-B both sides, 8k codes, smooth L1, crops from 0.2
    tokenizer = dict(in_channels=1280, codebook_size=8192, decoder="vit", loss="smooth_l1", patch_size=1,
                     crop_scale=(0.2, 1.0), dtype="bfloat16")


class ImageBindGlobal(GlobalFeatureModality):
    """ImageBind-H/14's global vector (1280-d, the trunk's class token): 16 tokens, one per Memcodes codebook."""

    name, label_order = "imagebind_global", 14
    labelled_per_crop = False
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_ImageBind-H14-global_8k_16_224"
    tokenizer = dict(in_channels=1280, codebook_size=8192, decoder="mlp", num_codebooks=16, loss="cosine",
                     patch_size=1, crop_scale=(0.2, 1.0), dtype="bfloat16")


def _bins(values, scale: float, offset: float) -> list[str]:
    return [f"v0={round(float(v) * scale + offset)}" for v in np.asarray(values, np.float64).reshape(-1)]


def pose_groups(stored: dict, index: int) -> dict[str, list[str]]:
    """One human's four groups of words, as the reference writes them: the body pose's 8 token ids (v0= below 512,
    v1= above), the global orientation's 9 values in [-1, 1], the camera's 3 in [-1, 19] (clipped), the shape's 10
    betas in [-3, 3], each binned to 0..999."""
    params = stored["pred_smpl_params"]
    ids = stored["pose_tokenized"][index] if "pose_tokenized" in stored else []  # before tokenize: none yet
    pose = [f"v0={i}" if i < 512 else f"v1={i - 512}" for i in (int(t) for t in ids)]
    return {"pose": ["pose", *pose],
            "global": ["global", *_bins(params["global_orient"][index], 499.5, 499.5)],
            "camera": ["camera", *_bins(np.clip(np.asarray(stored["pred_cam"][index], np.float64), -1, 19), 49.95,
                                        49.95)],
            "shape": ["shape", *_bins(params["betas"][index], 166.5, 499.5)]}


GROUPS = ("pose", "global", "camera", "shape")  # the reference's list, which it shuffles per human


class HumanPoses(SequenceModality):
    """Human poses (HMR2.0's SMPL fits) in the reference's per-sample JSON: `bbox_xyxy` (pixels), `pred_smpl_params`
    (`global_orient` (n, 1, 3, 3), `body_pose` (n, 23, 3, 3), `betas` (n, 10)), `pred_cam` (n, 3), and, where the
    tool gave them, `pose_tokenized` (n, 8).

    The body pose is 8 tokens of the pose tokenizer, the reference's (bottleneck MLPs around Memcodes, 1,024 codes
    x 8 codebooks, smooth L1 on the 207 numbers of the 23 joint rotations; its published
    `EPFL-VILAB/4M_tokenizers_human-poses_1k_8` converts), trained here on one human per sample (the reference: the
    first, and zeros without one; here one drawn per crop, and samples without a human left out). `tokenize`
    writes each sample's JSON with `pose_tokenized` from it into `tok_human_poses/`, which 4M reads (the reference
    reads the same JSON from `human_poses/`: a `path` entry there).

    4M reads, per human in a crop, `human` and its box (v0..v3 as boxes), then the four groups in an order drawn
    at each training load (`pose_groups`), at most 275 tokens; no human (or none left in the crop): `none`. As
    the reference, a mirrored crop keeps the unmirrored boxes and poses (a pose's rotations cannot be mirrored in
    token space)."""

    name, label_order, extension = "human_poses", 15, "json"
    max_tokens = 275             # 7 humans of 39 tokens, [EOS] and a sentinel
    embedding_length = 263       # the reference's embedding length for it (its max_length), less than max_tokens
    needs_photo = True
    published_tokenizer = "EPFL-VILAB/4M_tokenizers_human-poses_1k_8"
    tokenizer = dict(in_channels=207, codebook_size=1024, decoder="mlp", num_codebooks=8, loss="smooth_l1",
                     patch_size=1)
    token_grid = 4               # the tokenizer's settings ask a grid; a pose is one vector (8 codebooks, 8 ids)
    metric_name, baseline_name, channels_from_data = "l1", "the batch's mean pose", False
    pretokenized = True          # tok_human_poses/: the JSON with the ids tokenize filled in

    def encode(self, label) -> bytes:
        return json.dumps(label).encode()

    def decode(self, data: bytes):
        return json.loads(data)

    def check_label(self, label) -> None:
        if label == {}:
            return
        try:
            count = len(label["bbox_xyxy"])
            params = label["pred_smpl_params"]
            shapes = {"bbox_xyxy": (np.shape(label["bbox_xyxy"]), (count, 4)),
                      "pred_cam": (np.shape(label["pred_cam"]), (count, 3)),
                      "global_orient": ((np.size(params["global_orient"]),), (count * 9,)),
                      "body_pose": ((np.size(params["body_pose"]),), (count * 207,)),
                      "betas": (np.shape(params["betas"]), (count, 10))}
            if "pose_tokenized" in label:
                shapes["pose_tokenized"] = (np.shape(label["pose_tokenized"]), (count, 8))
        except (KeyError, TypeError) as err:
            raise ValueError(f"human_poses: not the reference's pose JSON (missing {err})") from None
        wrong = [f"{k} {got}, expected {want}" for k, (got, want) in shapes.items() if tuple(got) != want]
        if wrong:
            raise ValueError("human_poses: " + "; ".join(wrong))
        ids = np.asarray(label.get("pose_tokenized", []))
        if ids.size and (ids.min() < 0 or ids.max() >= 1024):
            raise ValueError(f"human_poses: pose_tokenized ids {ids.min()}..{ids.max()} outside 0..1023")

    def _text(self, stored: dict, crop, image_size, rng) -> str:
        if not stored:
            return "none"
        height, width = image_size
        top, left, h, w = (float(v) for v in crop[:4])
        humans = []
        for index, box in enumerate(stored["bbox_xyxy"]):
            x = (np.asarray(box, np.float64)[0::2] - left) / w  # the box in the crop, normalised to it
            y = (np.asarray(box, np.float64)[1::2] - top) / h
            if (x < 0).all() or (y < 0).all() or (x > 1).all() or (y > 1).all():
                continue
            x, y = x.clip(0, 1), y.clip(0, 1)
            coords = [f"v{i}={round(float(v) * (BINS - 1))}" for i, v in enumerate((x[0], y[0], x[1], y[1]))]
            groups = pose_groups(stored, index)
            order = GROUPS if rng is None else [GROUPS[i] for i in rng.permutation(len(GROUPS))]
            humans.append(" ".join(["human", *coords, *(word for g in order for word in groups[g])]) + " ")
        return "".join(humans) or "none"

    # -- the pose tokenizer: one human's body pose, 23 rotations as a (207, 1, 1) map -----------------------------
    @staticmethod
    def _poses(stored: dict) -> np.ndarray:
        poses = stored.get("pred_smpl_params", {}).get("body_pose", [])
        return np.asarray(poses, np.float32).reshape(-1, 207)

    def to_tensor(self, label, crop, image_size):
        """One human of the sample (drawn by the crop's numbers), or None without one (left out of training)."""
        poses = self._poses(label)
        if not len(poses):
            return None
        pose = poses[int(np.random.default_rng([int(v) for v in crop]).integers(len(poses)))]
        return torch.from_numpy(pose).reshape(207, 1, 1)

    def crops_input(self, label, crops, image_size):
        """Every human's body pose (a pose does not depend on the crop), and the label to fill in."""
        return torch.from_numpy(self._poses(label)).reshape(-1, 207, 1, 1), label

    def token_member(self, ids, label):
        filled = {**label, "pose_tokenized": ids.reshape(len(ids), -1).astype(int).tolist()} if label else label
        return "json", json.dumps(filled).encode()

    def reference_input(self, x):
        return x

    def from_reference_output(self, y):
        return y

    def reference_tokenizer_problems(self, cfg):
        if cfg.quant_type != "memcodes" or cfg.n_channels != 207:
            return [f"human_poses are 207 numbers per human: the tokenizer has quant_type={cfg.quant_type!r}, "
                    f"n_channels={cfg.n_channels}"]
        return []

    def tensor_picture(self, x):
        values = x.float().cpu().reshape(23, 9).numpy()
        return pictures.colormap_picture(values, "coolwarm", stretch=True)

    def metric(self, reconstruction, target):
        return self.metric_name, float((reconstruction.float() - target.float()).abs().mean())

    def baseline(self, target, classes=None):
        return target.float().mean(0, keepdim=True).expand_as(target)

    def baseline_metric(self, target, classes=None):
        return self.metric(self.baseline(target), target)[1]

    def corpus_text(self, data):  # its words for the text tokenizer: the boxes' bins are the boxes' own tokens
        whole = float(1 << 30)
        return self._text(self.decode(data), [0, 0, whole, whole, 0], (whole, whole), None)

    def to_text(self, data, crop, image_size, min_score, rng=None):
        return self._text(self.decode(data), crop, image_size, rng)


register(ImageBind())
register(ImageBindGlobal())
register(HumanPoses())
