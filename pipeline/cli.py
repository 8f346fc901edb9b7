"""`python -m pipeline COMMAND`: every stage without Prefect, plus the demo and the deployment server."""
from __future__ import annotations

import argparse
import json
import sys

from core import registry
from core.config import DEFAULT_PROFILE, Config, ConfigError, load_config
from core.storage import data_path, open_data_root
from pipeline import services
from pipeline.console import ShardProgress, print_alignment, print_summary
from pipeline.stage_list import stage

# Each command imports its stage when it runs, so the command line answers in seconds rather than after
# importing every stage (Prefect, transformers, timm) for any one of them.


def _add_config_args(parser: argparse.ArgumentParser, default: str = DEFAULT_PROFILE) -> None:
    parser.add_argument("--profile", default=default,
                        help=f"profile name (paper, demo) or a YAML path (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any configuration value, e.g. --set download.timeout=20 (repeatable)")


def _download_parser(sub) -> None:
    p = sub.add_parser("download", help=_stage_help("download", "download the images and captions"))
    p.add_argument("--input", required=True, help="CC12M TSV (url<TAB>caption), or parquet/CSV with url, caption")
    p.add_argument("--output", help="dataset root (default: the profile's data_root)")
    p.add_argument("--shard-size", type=int, help="input rows per shard (default 1000)")
    p.add_argument("--max-side", type=int, help="longest side of stored images (default 768, never upscaled)")
    p.add_argument("--processes", type=int, help="shards downloaded at once")
    p.add_argument("--threads", type=int, help="concurrent downloads per shard")
    p.add_argument("--allow-private-hosts", action="store_true", default=None,
                   help="allow URLs whose host is on a loopback, private or link-local address")
    p.add_argument("--retry-failed", action="store_true",
                   help="fetch again the rows of committed shards that failed for a reason that may pass (a timeout, "
                        "a network or DNS error, HTTP 5xx or 429; `python -m pipeline failures` lists them); the "
                        "stages after download redo those shards")
    _add_config_args(p)


def _config_from(args, flags: dict) -> Config:
    return load_config(args.profile, args.overrides, flags)


def _root(config: Config, writable: bool = True):
    """The configuration's data root, checked before any work: a bad URL, a missing bucket, refused credentials or
    a store that does not answer is a configuration error (exit 2) naming the URL."""
    return open_data_root(config.root, writable=writable)


def _existing_root(text: str, flag: str = "--data"):
    """A data root a command only reads (status, verify, show, align): checked, and there."""
    root = open_data_root(text, writable=False)
    if not root.is_dir():
        raise ConfigError(f"{flag} {text!r}: no such folder")
    return root


def cmd_download(args) -> int:
    config = _config_from(args, {
        "data_root": args.output, "download.shard_size": args.shard_size, "download.max_side": args.max_side,
        "download.processes": args.processes, "download.threads": args.threads,
        "download.allow_private_hosts": args.allow_private_hosts,
    })
    if not data_path(args.input).is_file():
        raise ConfigError(f"--input {args.input!r}: no such file")
    root = _root(config)
    from stages.download.download import run_download  # after the checks: a bad setting fails in 3 s, not 7
    progress = ShardProgress("download")
    try:
        summary = run_download(args.input, root, config, observer=progress, retry_failed=args.retry_failed)
    finally:
        progress.close()
    print_summary(summary, root)
    return 1 if summary.failed_shards else 0


def cmd_quality(args) -> int:
    config = _config_from(args, {"data_root": args.data})
    root = _root(config)
    from stages.quality.quality import run_quality
    progress = ShardProgress("quality")
    try:
        summary = run_quality(root, config, observer=progress)
    finally:
        progress.close()
    return print_per_model(summary, "", "scored", f"in {summary.seconds:.1f} s; scores under {root}/quality")


def cmd_label(args) -> int:
    names = [n.strip() for n in args.labelers.split(",")] if args.labelers else None
    config = _config_from(args, {"data_root": args.data, "label.labelers": names})
    root = _root(config)
    from stages.label.label import run_label
    progress = ShardProgress("label")
    try:
        summary = run_label(root, config, names, observer=progress, retry_failed=args.retry_failed)
    finally:
        progress.close()
    return print_per_model(summary, "", "labelled", f"in {summary.seconds:.1f} s; labels under {root}")


def cmd_import_labels(args) -> int:
    config = _config_from(args, {"data_root": args.data})
    root = _root(config)
    from stages.label.import_labels import run_import
    progress = ShardProgress(f"import {args.modality}")
    try:
        summary = run_import(root, config, args.modality, args.source, observer=progress)
    finally:
        progress.close()
    return print_per_model(summary, "", "imported", f"in {summary.seconds:.1f} s from {args.source}; labels under "
                                                    f"{root}/{args.modality}")


def print_per_model(summary, prefix: str, verb: str, details: str) -> int:
    """Sample fates per labeler or tokenizer, the shard counts, and the shards to redo; the exit status."""
    for name, counts in summary.status_counts.items():
        print(f"{prefix}{name:7} " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    if summary.shards_done == 0 and not summary.failed_shards:
        print(f"nothing to do: all {summary.shards_skipped} shards were already {verb}")
    else:
        print(f"{summary.shards_done} shards {verb}, {summary.shards_skipped} already committed, {details}")
    for shard, err in summary.failed_shards.items():
        print(f"shard {shard} failed and will be redone on the next run: {err.splitlines()[0]}", file=sys.stderr)
    return 1 if summary.failed_shards else 0


def cmd_train_tokenizer(args) -> int:
    modalities = None if args.modality in (None, "all") else [m.strip() for m in args.modality.split(",")]
    config = _config_from(args, {"data_root": args.data, "tokenizer.modalities": modalities})
    root = _root(config)
    from stages.tokenizers.train_tokenizer import run_train_tokenizers, tokenizer_dir, training_line

    def report(modality, result):
        if result.get("skipped"):
            print(f"{modality:7} already trained ({tokenizer_path(modality)})")
        elif modality == registry.TEXT:
            print(f"{modality:7} vocabulary of {result['vocab_size']} from {result['texts']} texts")
        else:
            print(f"{modality:7} {result['steps']} steps on {result['samples']} samples: "
                  f"{training_line(modality, result['final'])}")

    def tokenizer_path(modality):
        return tokenizer_dir(root, modality)

    run_train_tokenizers(root, config, modalities, observer=report)
    return 0


def cmd_tokenize(args) -> int:
    modalities = [m.strip() for m in args.modalities.split(",")] if args.modalities else None
    config = _config_from(args, {"data_root": args.data})
    root = _root(config)
    from stages.tokenizers.tokenize import run_tokenize
    progress = ShardProgress("tokenize")
    try:
        summary = run_tokenize(root, config, modalities, observer=progress)
    finally:
        progress.close()
    rate = f", {summary.tokens / summary.seconds:.0f} tokens/s" if summary.seconds and summary.tokens else ""
    status = print_per_model(summary, "tok_", "tokenized", f"{summary.tokens} tokens in {summary.seconds:.1f} s{rate}")
    print_alignment(summary.dropped, summary.unaligned, root)
    return status or (1 if summary.unaligned else 0)


def cmd_align(args) -> int:
    from stages.dataset.align import STAGE as ALIGN_STAGE
    from stages.dataset.align import align_dataset
    from stages.dataset.shards import DatasetLayout

    root = _existing_root(args.data)
    results = align_dataset(root)
    layout = DatasetLayout(root)
    dropped = sum(layout.read_stats(ALIGN_STAGE, s)["status_counts"].get("dropped", 0)
                  for s in layout.committed_shards(ALIGN_STAGE))
    unaligned = {shard: result for shard, result in results.items() if isinstance(result, str)}
    print(f"{len(results) - len(unaligned)} shards aligned now, the others already were")
    print_alignment(dropped, unaligned, root)
    return 1 if unaligned else 0


def cmd_verify(args) -> int:
    from pipeline.status import RANDOM_WARNING, random_weight_stages, stage_rows
    from stages.dataset.verify import verify_dataset

    root = _existing_root(args.data)
    problems, checked = verify_dataset(root)
    by_shard: dict[str, list] = {}
    for problem in problems:
        by_shard.setdefault(problem.shard, []).append(problem)
    for shard, found in sorted(by_shard.items()):
        print(f"{shard}: {len(found)} problem(s)")
        for problem in found:
            print(f"  {problem.folder}: {problem.message}")
    if checked:
        print(f"checked {checked['shards']} shards x {checked['folders']} folders, {checked['members']} members: "
              f"{'OK' if not problems else f'{len(problems)} problems'}")

    random_stages = random_weight_stages(stage_rows(root))
    if random_stages:
        print(RANDOM_WARNING.format(stages=", ".join(random_stages)))
    return 1 if problems else 0


def cmd_failures(args) -> int:
    from pipeline.status import failure_rows, format_table

    rows = failure_rows(_existing_root(args.data), args.stage)
    if args.out:
        import pyarrow as pa
        from pyarrow import csv

        columns = ["stage", "shard", "key", "status", "error", "url", "retryable"]
        csv.write_csv(pa.table({c: [r[c] for r in rows] for c in columns}), args.out)
        print(f"{len(rows)} failed rows -> {args.out}")
    else:
        print(format_table(rows) if rows else "no failed rows")
    return 0


def cmd_status(args) -> int:
    from pipeline.status import (
        RANDOM_WARNING,
        evaluation_rows,
        format_table,
        node_rows,
        pretrain_row,
        random_weight_stages,
        stage_rows,
        tokenizer_rows,
    )

    root = _existing_root(args.data)
    rows = stage_rows(root)
    print(format_table(rows))
    random_stages = random_weight_stages(rows)
    if random_stages:
        print("\n" + RANDOM_WARNING.format(stages=", ".join(random_stages)))
    nodes = node_rows(root)
    if len({row["node"] for row in nodes}) > 1:  # work spread over machines: where it ran, how fast
        print("\nper node\n" + format_table(nodes))
    tokenizers = tokenizer_rows(root)
    if tokenizers:
        print("\n" + format_table(tokenizers))
    pretrain = pretrain_row(root)
    if pretrain:
        print("\n" + format_table([pretrain]))
    evaluations = evaluation_rows(root)
    if evaluations:
        print("\n" + format_table(evaluations))
    return 0


def cmd_services(args) -> int:
    if args.command == "up":
        services.up()
    elif args.command == "down":
        services.down()
    else:
        services.status()
    return 0


def cmd_show(args) -> int:
    from pipeline.show import draw_sample
    from stages.dataset.shards import DatasetLayout

    print(draw_sample(DatasetLayout(_existing_root(args.data)), args.key, args.out))
    return 0


def cmd_pretrain(args) -> int:
    config = _config_from(args, {"data_root": args.data, "pretrain.size": args.size, "pretrain.steps": args.steps})
    root = _root(config)
    from stages.fourm.pretrain import run_dir, run_pretrain
    summary = run_pretrain(root, config)
    final = summary["final"]
    losses = ", ".join(f"{k.removeprefix('loss.')} {v:.4g}" for k, v in final.items() if k.startswith("loss."))
    print(f"4M-{config.pretrain.size}: {summary['steps']} steps on {summary['workers']} worker(s); "
          f"loss {final.get('loss', float('nan')):.4g} ({losses}) -> {run_dir(root)}/")
    return 0


def cmd_transfer(args) -> int:
    config = _config_from(args, {f"transfer.{args.task}.linear_probe": True if args.linear_probe else None})
    from stages.transfer.transfer import run_transfer
    results = run_transfer(args.task, args.train, args.val, config, model=args.model, backbone=args.backbone,
                           out=args.out)
    paper = results["paper"]
    scores = ", ".join(f"{k} {v:.4g}" for k, v in results["metrics"].items())
    print(f"{args.task} transfer of {results['backbone']}: {scores} after {results['steps']} steps on "
          f"{results['samples']} training images -> {results['folder']}/")
    print(f"the paper's {paper['metric']} on the full dataset (Table 1): 4M-B {paper['4M-B']}, 4M-L {paper['4M-L']}, "
          f"MAE-B {paper['MAE-B']}, MAE-L {paper['MAE-L']}")
    return 0


def cmd_evaluate(args) -> int:
    from stages.fourm.pretrain import run_dir
    from stages.transfer.evaluate import run_evaluate

    config = _config_from(args, {"data_root": args.data})
    root = _root(config)
    model = args.model or run_dir(root)
    results = run_evaluate(root, config, model, samples=args.samples)
    print(f"4M from RGB alone on {results['samples']} validation samples ({', '.join(results['val_shards'])}):")
    for name, scores in results["scores"].items():
        figures = ", ".join(f"{k} {v:.4g} (each sample's mean or majority: {scores[k + '_baseline']:.4g})"
                            for k, v in scores.items() if not k.endswith("_baseline"))
        print(f"  {name}: {figures}")
    losses = ", ".join(f"{k.removeprefix('val_loss.')} {v:.4g}" for k, v in results["val_loss"].items())
    print(f"  masked validation loss: {losses}\npicture: {results['picture']}")
    return 0


def generation_request(args) -> dict:
    """The command line's one request (the JSONL format's keys)."""
    conditions = {}
    for item in args.condition or []:
        modality, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--condition {item!r}: expected MODALITY=VALUE (caption=\"a red bus\", rgb=photo.jpg)")
        conditions[modality] = value
    inpaint = {}
    for item in args.inpaint or []:
        modality, sep, region = item.partition("=")
        rows, _, cols = region.partition(",")
        try:
            inpaint[modality] = [int(v) for v in (*rows.split(":"), *cols.split(":"))]
        except ValueError:
            raise ValueError(f"--inpaint {item!r}: expected MODALITY=ROW0:ROW1,COL0:COL1 (token rows and "
                             f"columns)") from None
    guidance = {}
    for item in args.guidance or []:
        modality, sep, weight = item.partition("=")
        try:
            guidance[modality] = float(weight)
        except ValueError:
            raise ValueError(f"--guidance {item!r}: expected MODALITY=WEIGHT (caption=2, rgb=-0.5)") from None
    request = {"name": args.name, "conditions": conditions, "targets": args.targets, "schedule": args.schedule,
               "scheme": args.scheme, "steps": args.steps, "cfg": args.cfg, "guidance": guidance,
               "temperature": args.temperature,
               "temperature_schedule": args.temperature_schedule, "top_k": args.top_k, "top_p": args.top_p,
               "seed": args.seed, "samples": args.samples, "inpaint": inpaint}
    return {k: v for k, v in request.items() if v not in (None, {}, [])}


def cmd_generate(args) -> int:
    from stages.dataset.shards import DatasetLayout
    from stages.fourm.pretrain import run_dir
    from stages.generate.generate import read_requests, run_generation

    config = _config_from(args, {"data_root": args.data})
    root = _root(config)
    model = data_path(args.model) if args.model else run_dir(root)
    tokenizers = args.tokenizers or DatasetLayout(root).tokenizers_dir
    requests = read_requests(args.requests) if args.requests else [generation_request(args)]
    out = args.out or model / "generations"
    results = run_generation(requests, model, tokenizers, out, batch_size=args.batch_size, device=args.device,
                             progress=True)
    for request in results["requests"]:
        for i, sample in enumerate(request["samples"]):
            texts = "; ".join(f"{k}: {v['text']!r}" for k, v in sample.items() if isinstance(v, dict) and "text" in v)
            print(f"{request['name']} sample {i}: {sample['grid']}" + (f"  ({texts})" if texts else ""))
    print(f"tokens (.npy), pictures (.png) and texts per sample under {out}/; index: {out}/results.json")
    return 0


def cmd_inspect_masking(args) -> int:
    from pipeline.show import draw_masked_sample
    from stages.fourm.fourm_data import inspect_masking, is_sequence, text_tokenizer_of

    config = _config_from(args, {"data_root": args.data})
    root = _root(config, writable=False)
    means, first = inspect_masking(root, config, args.samples)
    if args.json:
        print(json.dumps({"samples": args.samples, "mean_tokens": means}, indent=1))
    else:
        print(f"mean tokens per sample over {args.samples} masked samples "
              f"(budgets: {config.pretrain.input_tokens} in, {config.pretrain.target_tokens} out)")
        width = max(16, *map(len, means))
        print(f"{'modality':{width}} {'input':>7} {'target':>7}")
        for m, parts in means.items():
            print(f"{m:{width}} {parts['input']:7.1f} {parts['target']:7.1f}")
    if args.out:
        has_text = any(is_sequence(m) for m in first)
        picture = draw_masked_sample(first, text_tokenizer_of(root) if has_text else None, args.out)
        print(f"one masked sample: {picture}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_random_models(args) -> int:
    from models.random_weights import random_model_names, save_random_models

    modalities = _config_from(args, {}).modality_set  # a profile's modalities have labelers too (paper21: T5, SAM)
    known = random_model_names(modalities)
    names = [n.strip() for n in args.labelers.split(",")] if args.labelers else known
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"--labelers {unknown}: no random model (known: {', '.join(known)})")
    for name, path in save_random_models(args.out, args.size, names).items():
        print(f"{name:7} {path}")
    return 0


def cmd_convert_omnidata(args) -> int:
    from models.omnidata import convert_checkpoint as convert_omnidata_checkpoint

    report = convert_omnidata_checkpoint(args.checkpoint, args.out, args.task, trust_pickle=args.trust_pickle,
                                verify=not args.no_verify)
    checked = ("not checked" if report["max_abs_diff"] is None
               else f"outputs match the checkpoint's own layout within {report['max_abs_diff']:.2g}")
    print(f"{args.task}: {report['tensors']} tensors -> {report['out_dir']} ({checked})")
    return 0


def cmd_convert_quality(args) -> int:
    from models.quality import convert_aesthetic, convert_watermark

    convert = convert_aesthetic if args.command == "convert-aesthetic" else convert_watermark
    print(f"{args.checkpoint} -> {convert(args.checkpoint, args.out)}")
    return 0


def cmd_convert_4m(args) -> int:
    from models.fourm import convert_checkpoint as convert_4m_checkpoint

    model = convert_4m_checkpoint(args.checkpoint, args.out, args.modalities or [])
    cfg = model.cfg
    print(f"4M ({cfg.encoder_depth}+{cfg.decoder_depth} blocks, width {cfg.dim}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters without embeddings) -> {args.out}\n"
          f"  in:  {', '.join(cfg.domains_in)}\n  out: {', '.join(cfg.domains_out)}")
    return 0


def cmd_convert_tokenizer(args) -> int:
    from stages.tokenizers.dataset_tokenizers import convert_published, folder

    out = args.out or folder(_root(_config_from(args, {"data_root": args.data})), args.modality)
    summary = convert_published(args.checkpoint, args.modality, out)
    print(f"{args.modality}: {summary['decoder']} tokenizer, {summary['codebook_size']} codes -> {out}")
    return 0


def cmd_demo(args) -> int:
    if args.cluster:
        from pipeline.cluster_demo import run_cluster_demo

        return run_cluster_demo(lambda settings: _config_from(args, {"data_root": args.output, **settings}),
                                workers=args.cluster)
    from pipeline.demo import run_demo

    return run_demo(_config_from(args, {"data_root": args.output}))


def cmd_serve(args) -> int:
    from pipeline.deployments import serve

    serve()
    return 0


def _stage_help(name: str, text: str) -> str:
    return f"{text}: {stage(name).summary}"


class RegistryHelp(argparse.HelpFormatter):
    """Fills {labelled} and {tokenizers} in a help text from the registry when the help is shown: reading the
    registry imports the modalities' model code (torch, transformers: about 3 s), which `up`, `down` or `services`
    should not wait for."""

    def _expand_help(self, action):
        text = super()._expand_help(action)
        if "{labelled}" in text:
            text = text.replace("{labelled}", ",".join(m.name for m in registry.ModalitySet().labelled()))
        if "{tokenizers}" in text:
            text = text.replace("{tokenizers}", ", ".join(registry.ModalitySet().tokenizer_names()))
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="The 4M data engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    _download_parser(sub)
    demo = sub.add_parser("demo", help="serve the bundled photos over loopback and build the demo dataset")
    demo.add_argument("--output", help="dataset root (default: the profile's data_root)")
    demo.add_argument("--cluster", type=int, metavar="WORKERS", help="across a Ray cluster started on this machine "
                      "(a head and WORKERS worker nodes), one worker node killed in the middle of labelling; then "
                      "each node's share and the exactly-once check (make cluster-demo)")
    _add_config_args(demo, default="demo")
    quality = sub.add_parser("quality", help=_stage_help("quality", "score every photo: CLIP image-text score, "
                                                                     "aesthetic, watermark, embedding"))
    quality.add_argument("--data", help="dataset root (default: the profile's data_root)")
    _add_config_args(quality)
    for command, published in (("convert-aesthetic", "the LAION aesthetic predictor (sac+logos+ava1-l14-linearMSE.pth)"),
                               ("convert-watermark", "the LAION-5B watermark detector (watermark_model_v1.pt)")):
        converter = sub.add_parser(command, help=f"convert {published} into a quality model folder")
        converter.add_argument("--checkpoint", required=True, help="the published state dict")
        converter.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    label = sub.add_parser("label", help=_stage_help("pseudo-label", "pseudo-label the photos with every labeler"),
                           formatter_class=RegistryHelp)
    label.add_argument("--data", help="dataset root (default: the profile's data_root)")
    label.add_argument("--labelers", help="comma-separated subset of {labelled} (default: label.labelers)")
    label.add_argument("--retry-failed", action="store_true",
                       help="redo too each committed shard of a labeler that failed on some photo for a reason that "
                            "may pass (model_error: out of memory, a device error; not a photo that does not "
                            "decode); the stages built on it (its tokens, labelers that read it) redo it after")
    _add_config_args(label)
    imported = sub.add_parser("import-labels", help="bring an external tool's labels in as one modality's label "
                                                    "shards (ImageBind, human poses): <key>.<extension> files -> "
                                                    "<modality>/ shards aligned with rgb/")
    imported.add_argument("--data", help="dataset root (default: the profile's data_root)")
    imported.add_argument("--modality", required=True, help="the modality the files are (its registry entry checks "
                                                            "each one), e.g. imagebind")
    imported.add_argument("--source", required=True, help="folder of one file per sample, named <key>.<extension>")
    _add_config_args(imported)
    show = sub.add_parser("show", help="draw one sample's image, caption and labels into a PNG")
    show.add_argument("--data", required=True, help="dataset root")
    show.add_argument("--key", required=True, help="sample key, e.g. 000000004")
    show.add_argument("--out", required=True, help="PNG file to write")
    pretrain = sub.add_parser("pretrain", help=_stage_help("pretrain", "pretrain 4M on Ray Train"))
    _add_config_args(pretrain)
    pretrain.add_argument("--data", help="dataset root with token shards (default: the profile's data_root)")
    pretrain.add_argument("--size", choices=["Ti", "S", "B", "L", "XL"], help="4M size (default: the profile's)")
    pretrain.add_argument("--steps", type=int, help="optimizer steps (default: the profile's)")
    inspect = sub.add_parser("inspect-masking", help="mean input and target tokens per modality, and one masked sample")
    _add_config_args(inspect)
    inspect.add_argument("--data", help="dataset root with token shards (default: the profile's data_root)")
    inspect.add_argument("--samples", type=int, default=1000, help="masked samples to average over")
    inspect.add_argument("--out", help="PNG of one masked sample")
    inspect.add_argument("--json", action="store_true", help="print the figures as JSON")
    models = sub.add_parser("random-models", help="save random-weight labeler models of the real classes")
    models.add_argument("--out", required=True, help="folder; one subfolder per labeler")
    models.add_argument("--size", default="tiny", choices=["tiny", "paper"])
    models.add_argument("--labelers", help="comma-separated subset (default: every labeler of the profile's "
                                           "modalities)")
    _add_config_args(models)
    train = sub.add_parser("train-tokenizer", help=_stage_help("train-tokenizers", "train the tokenizers: text "
                                                                                    "(WordPiece) and the VQ-VAEs"),
                           formatter_class=RegistryHelp)
    train.add_argument("--data", help="dataset root (default: the profile's data_root)")
    train.add_argument("--modality", help="{tokenizers}, comma-separated, or all (default: "
                                          "tokenizer.modalities)")
    _add_config_args(train)
    tokenize = sub.add_parser("tokenize", help=_stage_help("tokenize", "encode every sample's crops with the trained "
                                                                        "tokenizers"))
    tokenize.add_argument("--data", help="dataset root (default: the profile's data_root)")
    tokenize.add_argument("--modalities", help="comma-separated dense modalities (default: every trained one)")
    _add_config_args(tokenize)
    sub.add_parser("up", help="start the Prefect server, a Ray head and the deployment server in the background")
    sub.add_parser("down", help="stop what `up` started (by recorded process ids)")
    sub.add_parser("services", help="say which of the local services run")
    status = sub.add_parser("status", help="each stage's progress, read from the dataset's status files alone")
    status.add_argument("--data", required=True, help="dataset root")
    failures = sub.add_parser("failures", help="every failed row (stage, shard, key, status, error, URL), from the "
                                               "status files; `download --retry-failed` fetches the retryable ones")
    failures.add_argument("--data", required=True, help="dataset root")
    failures.add_argument("--stage", action="append", help="a status folder (download, label_depth, ...); repeatable; "
                                                           "default: every stage")
    failures.add_argument("--out", help="write them as CSV here instead of printing them")
    align = sub.add_parser("align", help="drop every sample missing from any loader folder from all of them "
                                         "(the tokenize stage does this itself)")
    align.add_argument("--data", required=True, help="dataset root")
    verify = sub.add_parser("verify", help="check that every modality folder is whole and aligned with rgb/")
    verify.add_argument("--data", required=True, help="dataset root")
    convert = sub.add_parser("convert-omnidata",
                             help="convert an Omnidata DPT-Hybrid v2 checkpoint into a transformers folder")
    convert.add_argument("--checkpoint", required=True, help="omnidata_dpt_{depth,normal}_v2.ckpt")
    convert.add_argument("--task", required=True, choices=["depth", "normal"])
    convert.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="load pickled objects besides tensors (only for checkpoints from a trusted source)")
    convert.add_argument("--no-verify", action="store_true",
                         help="skip running both layouts on a random input and comparing the outputs")
    transfer = sub.add_parser("transfer", help="fine-tune 4M's encoder (or a timm baseline) on classification, "
                                               "segmentation or depth and score it (Ray Train)")
    _add_config_args(transfer)
    transfer.add_argument("--task", required=True, choices=["classification", "segmentation", "depth"])
    transfer.add_argument("--train", required=True, help="training data: ImageNet class folders, an ADE20K root, or "
                                                         "an NYUv2 folder with rgb/ and depth/ (see the README)")
    transfer.add_argument("--val", required=True, help="validation data, in the same layout")
    transfer.add_argument("--model", help="a 4M folder (a pretraining run or a convert-4m output); with a timm "
                                          "backbone, a local timm checkpoint file (default: random initialisation)")
    transfer.add_argument("--backbone", help="fourm (default), or a timm model name, e.g. vit_base_patch16_224")
    transfer.add_argument("--out", help="run folder (default: <model>/transfer-<task>, or runs/transfer-<task>-<name>)")
    transfer.add_argument("--linear-probe", action="store_true", help="freeze the backbone; train the head alone")
    evaluate = sub.add_parser("evaluate", help="score a 4M model's depth, normals and segmentation from RGB alone "
                                               "against the pseudo labels of the held-out shards")
    _add_config_args(evaluate)
    evaluate.add_argument("--data", help="dataset root (default: the profile's data_root)")
    evaluate.add_argument("--model", help="a 4M folder (default: <data>/pretrain)")
    evaluate.add_argument("--samples", type=int, default=200, help="validation samples to score (default: 200)")
    generate = sub.add_parser("generate", help="generate any modalities from any others with a 4M model (MaskGIT, "
                                               "ROAR, left-to-right; guidance; chained schedules)")
    _add_config_args(generate)
    generate.add_argument("--data", help="dataset root (default: the profile's data_root)")
    generate.add_argument("--model", help="a 4M folder (default: <data>/pretrain)")
    generate.add_argument("--tokenizers", help="the dataset's tokenizers folder (default: <data>/tokenizers)")
    generate.add_argument("--condition", action="append", metavar="MODALITY=VALUE",
                          help="a condition, repeatable: caption=\"a red bus\", rgb=photo.jpg, tok_rgb=photo.jpg, "
                               "det=boxes.json, tok_clip=ids.npy (-1 = generate)")
    generate.add_argument("--targets", help="modalities to generate, in order, e.g. tok_clip,tok_rgb,tok_depth,caption")
    generate.add_argument("--schedule", help="a chained schedule (YAML; see the README) instead of --targets")
    generate.add_argument("--requests", help="a JSONL file of requests instead of the flags above")
    generate.add_argument("--scheme", choices=["maskgit", "roar"], help="image decoding (default: maskgit)")
    generate.add_argument("--steps", type=int, help="decoding steps per image target (default: 8)")
    generate.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: 1, none)")
    generate.add_argument("--guidance", action="append", metavar="MODALITY=WEIGHT",
                          help="multimodal guidance, repeatable: each condition weighed on its own (negative: away)")
    generate.add_argument("--temperature", type=float, help="sampling temperature (default: 1)")
    generate.add_argument("--temperature-schedule", help="constant, linear or onex:<min>:<power>")
    generate.add_argument("--top-k", type=float, help="keep the k most likely tokens (a fraction < 1: of the vocab)")
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass")
    generate.add_argument("--inpaint", action="append", metavar="MODALITY=ROW0:ROW1,COL0:COL1",
                          help="regenerate this region of a given image modality's 14x14 tokens")
    generate.add_argument("--seed", type=int, default=0, help="seed of the first sample (sample i: seed + i)")
    generate.add_argument("--samples", type=int, default=1, help="samples per request")
    generate.add_argument("--name", default="request", help="the request's folder name under --out")
    generate.add_argument("--batch-size", type=int, default=16, help="samples decoded together")
    generate.add_argument("--device", help="cuda or cpu (default: cuda where available)")
    generate.add_argument("--out", help="output folder (default: <model>/generations)")
    convert4m = sub.add_parser("convert-4m", help="convert a reference 4M checkpoint (apple/ml-4m) for FourM")
    convert4m.add_argument("--checkpoint", required=True,
                           help="a folder with config.json + model.safetensors, one .safetensors with the settings "
                                "in its metadata, or a hub id such as EPFL-VILAB/4M-7_B_CC12M (needs a network)")
    convert4m.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    convert4m.add_argument("--modalities", nargs="+", metavar="MODULE",
                           help="modules defining modalities beyond 4M's seven (4M-21's: models.modalities_4m21 "
                                "models.modalities_4m21_networks); "
                                "recorded in the model's config.json, imported wherever it is loaded")
    convert_tok = sub.add_parser("convert-tokenizer", help="install one of apple/ml-4m's published tokenizers as "
                                 "a modality's tokenizer (tokenize, generate and evaluate then use it)")
    convert_tok.add_argument("--checkpoint", required=True,
                             help="a folder with config.json + model.safetensors, one .safetensors with the settings "
                                  "in its metadata, or a hub id such as EPFL-VILAB/4M_tokenizers_rgb_16k_224-448 "
                                  "(needs a network)")
    convert_tok.add_argument("--modality", required=True, help="the modality it tokenizes (rgb, depth, ...)")
    convert_tok.add_argument("--data", help="dataset root (default: the profile's data_root)")
    convert_tok.add_argument("--out", help="folder to write (default: <data>/tokenizers/<modality>)")
    _add_config_args(convert_tok)
    sub.add_parser("serve", help="serve the Prefect deployments (download/cc12m, ...) to a Prefect API")
    return parser


COMMANDS = {"download": cmd_download, "failures": cmd_failures, "quality": cmd_quality, "label": cmd_label, "import-labels": cmd_import_labels, "show": cmd_show, "random-models": cmd_random_models,
            "inspect-masking": cmd_inspect_masking, "pretrain": cmd_pretrain, "transfer": cmd_transfer,
            "evaluate": cmd_evaluate, "generate": cmd_generate,
            "convert-omnidata": cmd_convert_omnidata, "convert-aesthetic": cmd_convert_quality,
            "convert-watermark": cmd_convert_quality, "convert-4m": cmd_convert_4m, "convert-tokenizer": cmd_convert_tokenizer, "demo": cmd_demo,
            "serve": cmd_serve,
            "train-tokenizer": cmd_train_tokenizer, "tokenize": cmd_tokenize, "verify": cmd_verify,
            "status": cmd_status, "align": cmd_align, "up": cmd_services, "down": cmd_services, "services": cmd_services}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError) as err:  # InputError and friends, or an output that must not be
        print(f"error: {err}", file=sys.stderr)       # overwritten: bad input named by the message
        return 2
