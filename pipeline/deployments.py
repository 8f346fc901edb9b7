"""The Prefect deployments, served by `python -m pipeline serve` from the checkout (`make up` runs it).

`<flow>/cc12m` runs the `paper` profile on `data/cc12m` (the real models and settings, CC12M's list at
`data/cc12m.tsv`); `<flow>/demo` runs the `demo` profile on `data/demo`, the bundled photos served over loopback
and tiny random-weight models. `prefect deployment run pseudo-label/cc12m` then hands the server a run;
`--param` overrides a parameter for one run (`--param data=/mnt/cc12m`).
"""
from __future__ import annotations

from pipeline.flows import (
    cc12m_pipeline_flow,
    download_flow,
    evaluate_flow,
    generate_flow,
    pretrain_flow,
    pseudo_label_flow,
    quality_flow,
    tokenize_flow,
    train_tokenizers_flow,
    transfer_flow,
)
from stages.dataset.shards import DatasetLayout

STAGE_FLOWS = {
    # flow -> (what it does, its parameters on CC12M, its parameters on the demo)
    download_flow: ("Download a URL list (url<TAB>caption) into webdataset shards.",
                    {"input": "data/cc12m.tsv", "output": "data/cc12m"}, {"input": "demo", "output": "data/demo"}),
    quality_flow: ("Score every downloaded photo (CLIP image-text score, aesthetic, watermark) and find "
                   "near-duplicate photos, before labelling.", {"data": "data/cc12m"}, {"data": "data/demo"}),
    pseudo_label_flow: ("Pseudo-label every rgb shard: depth, normals, segmentation, boxes, CLIP maps.",
                        {"data": "data/cc12m"}, {"data": "data/demo"}),
    train_tokenizers_flow: ("Train the text tokenizer and one VQ-VAE per dense modality (Ray Train).",
                            {"data": "data/cc12m"}, {"data": "data/demo"}),
    tokenize_flow: ("Encode every sample's crops into tok_<modality>@224 shards with the trained tokenizers.",
                    {"data": "data/cc12m"}, {"data": "data/demo"}),
    pretrain_flow: ("Pretrain 4M on the token shards (Ray Train), resuming from its last checkpoint.",
                    {"data": "data/cc12m"}, {"data": "data/demo"}),
    evaluate_flow: ("Score the pretrained 4M's depth, normals and segmentation from RGB alone against the held-out "
                    "pseudo labels.", {"data": "data/cc12m"}, {"data": "data/demo", "samples": 8}),
    cc12m_pipeline_flow: ("URLs to a trained 4M: download, quality scores, pseudo-label, train tokenizers, tokenize, "
                          "pretrain; resumes where it stopped.", {"input": "data/cc12m.tsv", "data": "data/cc12m"},
                          {"input": "demo", "data": "data/demo"}),
}


TRANSFERS = {  # transfer/<name>: the paper's fine-tunes of the CC12M model, on local copies of the datasets
    "imagenet1k": {"task": "classification", "train": "data/imagenet/train", "val": "data/imagenet/val"},
    "ade20k": {"task": "segmentation", "train": "data/ADEChallengeData2016", "val": "data/ADEChallengeData2016"},
    "nyuv2": {"task": "depth", "train": "data/nyuv2/train", "val": "data/nyuv2/val"},
}


def deployments() -> list:
    made = [transfer_flow.to_deployment(name=name, parameters={**params, "model": "data/cc12m/pretrain",
                                                                "profile": "paper"},
                                        description=f"Fine-tune and score the CC12M 4M on {name} "
                                                    f"({params['task']}, the paper's settings).")
            for name, params in TRANSFERS.items()]
    # the demo's: its model fine-tuned on the colour classes `make demo` writes from the bundled photos
    demo = DatasetLayout("data/demo")
    made.append(transfer_flow.to_deployment(
        name="demo", parameters={"task": "classification", "train": str(demo.colour_classes_dir / "train"),
                                 "val": str(demo.colour_classes_dir / "val"), "model": str(demo.pretrain_dir),
                                 "profile": "demo"},
        description="Fine-tune the demo's tiny 4M on four colour classes made from the demo photos (after "
                    "`make demo`)."))
    for name, root in (("cc12m", "data/cc12m"), ("demo", "data/demo")):
        layout = DatasetLayout(root)
        made.append(generate_flow.to_deployment(
            name=name, parameters={"requests": str(layout.generate_dir / "requests.jsonl"),
                                   "model": str(layout.pretrain_dir), "tokenizers": str(layout.tokenizers_dir),
                                   "out": str(layout.pretrain_dir / "generations")},
            description=f"Generate from the requests in {root}/generate/requests.jsonl (one JSON object a line) with "
                        f"the {name} 4M" + (" (`make demo` writes them: a caption and a photo)." if name == "demo"
                                            else "; pictures of every sample as an artifact.")))
    for flow, (description, cc12m, demo) in STAGE_FLOWS.items():
        made.append(flow.to_deployment(name="cc12m", parameters={**cc12m, "profile": "paper"},
                                       description=f"{description} CC12M with the paper's models and settings."))
        made.append(flow.to_deployment(name="demo", parameters={**demo, "profile": "demo"},
                                       description=f"{description} The demo: bundled photos, tiny random-weight "
                                                   "models."))
    return made


def serve() -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments())
