"""Transfer evaluation: the 4M encoder as a backbone, the metrics on hand-computed cases, layer-wise learning-rate
decay, short fine-tunes on datasets in ImageNet, ADE20K and NYUv2 layouts built from the test photos (they must
beat an untrained head), resume, the timm baseline backbone, and bad input named before training."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.config import load_config
from models.fourm import FourM, FourMConfig
from models.metrics import IGNORE
from models.transfer import BackboneError, FourMViT, TransferModel, make_backbone, make_head
from stages.training import LoopSettings, train_loop
from stages.transfer.transfer import (
    TransferTask,
    confusion,
    depth_scores,
    depth_sums,
    evaluate,
    make_transfer_plan,
    run_transfer,
    segmentation_scores,
    topk_correct,
)
from stages.transfer.transfer_data import TransferInputError
from tests.helpers import UNSCORED, photo_tensor

SIZE = 64
SETTINGS = ["transfer.device=cpu", "transfer.log_every=2", "transfer.checkpoint_every=3"]
TASK = {"image_size": SIZE, "batch_size": 4, "warmup_epochs": 1, "drop_path": 0.0, "loader_workers": 0}


def config(task="classification", **settings):
    values = {**TASK, **settings}
    return load_config("demo", [*SETTINGS, *UNSCORED, f"transfer.{task}={json.dumps(values)}"])


def tiny_fourm(folder, inputs=("rgb@224", "tok_rgb@224")):
    torch.manual_seed(0)
    model = FourM(FourMConfig.sized("Ti", dim=32, encoder_depth=2, decoder_depth=1, num_heads=2,
                                    domains_in=list(inputs), domains_out=["tok_rgb@224"],
                                    vocab_sizes={"tok_rgb@224": 64}))
    model.save_pretrained(folder)
    return folder


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def photos(size=SIZE):
    return ((photo_tensor(size) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "grey": (128, 128, 128), "red": (210, 40, 40)}


def classification_folders(root):
    """Four colour classes a tiny model separates: photos tinted halfway to the class's colour."""
    images = photos()
    for split, chosen in (("train", range(0, 6)), ("val", range(6, 8))):
        for name, colour in COLOURS.items():
            for i in chosen:
                tinted = (images[i] * 0.5 + np.array(colour) * 0.5).astype(np.uint8)
                save_png(root / split / name / f"{i}.png", tinted)
    return root / "train", root / "val"


def segmentation_folder(root):
    """ADE20K's layout: class 1 (id 0) where the photo is bright, 2 (id 1) where dark; a border unlabelled."""
    for split, chosen in (("training", range(0, 6)), ("validation", range(6, 8))):
        for i in chosen:
            image = photos()[i]
            save_png(root / "images" / split / f"ADE_{i}.jpg", image)
            label = np.where(image.mean(-1) > 110, 1, 2).astype(np.uint8)
            label[:2] = 0
            save_png(root / "annotations" / split / f"ADE_{i}.png", label)
    return root


def depth_folder(root, split_range):
    """NYUv2's layout: 16-bit millimetres, nearer where brighter."""
    for i in split_range:
        image = photos()[i]
        save_png(root / "rgb" / f"{i}.png", image)
        depth = (1000 + 3000 * (1 - image.mean(-1) / 255)).astype(np.uint16)
        depth[0, 0] = 0  # a pixel without a measurement
        save_png(root / "depth" / f"{i}.png", depth)
    return root


# -- the backbone ---------------------------------------------------------------------------------------------------
def test_the_backbone_is_the_pretrained_encoder_and_takes_other_sizes(tmp_path):
    model = FourM.from_pretrained(tiny_fourm(tmp_path / "m")).eval()
    pixels = torch.randn(2, 3, 224, 224)
    visible = torch.zeros(2, 196, dtype=torch.bool)
    x, emb, mask = model._encoder_tokens({"rgb@224": {"tensor": pixels, "input_mask": visible}}, 196)
    x = x + emb
    for block in model.encoder:
        x = block(x, mask[:, None, :])
    backbone = FourMViT.from_fourm(model).eval()
    assert torch.allclose(backbone(pixels), model.encoder_norm(x), atol=1e-5)
    assert backbone(torch.randn(1, 3, 64, 96)).shape == (1, 4 * 6, 32)  # positions rebuilt for a 4x6 grid
    with pytest.raises(BackboneError, match="no RGB pixel embedding"):
        make_backbone(str(tiny_fourm(tmp_path / "tokens-only", inputs=("tok_rgb@224",))), None, 0.0, SIZE)


def test_layer_wise_decay_scales_each_blocks_learning_rate(tmp_path):
    cfg = config("classification", layer_decay=0.5)
    backbone = make_backbone(str(tiny_fourm(tmp_path / "m")), None, 0.0, SIZE)
    model = TransferModel(backbone, make_head("classification", 32, 4))
    task = TransferTask.__new__(TransferTask)
    task.s = cfg.transfer.classification
    groups = task.parameter_groups(model)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # 2 blocks: the stem at 0.5^3, block 0 at 0.5^2, block 1 and the final norm at 0.5 (as timm groups its ViTs),
    # the head at 1
    assert scale[id(named["backbone.patch_embed.weight"])] == pytest.approx(0.125)
    assert scale[id(named["backbone.blocks.0.attn.qkv.weight"])] == pytest.approx(0.25)
    assert scale[id(named["backbone.blocks.1.mlp.fc2.weight"])] == pytest.approx(0.5)
    assert scale[id(named["backbone.norm.weight"])] == pytest.approx(0.5)
    assert scale[id(named["head.fc.weight"])] == 1.0
    # the loop applies the scale: a step at lr 1e-2 moves the stem 8x less than the head would
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    from stages.training import apply_lr

    apply_lr(optimizer, 0.01)
    assert {round(g["lr"], 6) for g in optimizer.param_groups} == {0.00125, 0.0025, 0.005, 0.01}


# -- metrics --------------------------------------------------------------------------------------------------------
def test_metrics_on_hand_computed_cases():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2)) == {1: 1, 2: 2}
    truth = torch.tensor([[0, 0, 1, IGNORE]])
    predicted = torch.tensor([[0, 1, 1, 0]])
    scores = segmentation_scores(confusion(predicted, truth, 3))
    # class 0: 1 hit of union 2; class 1: 1 of 2; class 2 absent everywhere: left out
    assert scores["miou"] == pytest.approx(50.0) and scores["pixel_accuracy"] == pytest.approx(200 / 3)
    prediction, target = torch.tensor([[1.0, 2.0, 4.0, 9.0]]), torch.tensor([[1.0, 1.0, 5.0, 0.0]])
    d = depth_scores(depth_sums(prediction, target))
    assert d["delta1"] == pytest.approx(100 / 3)  # ratios 1, 2, 1.25: only the first is below 1.25
    assert d["abs_rel"] == pytest.approx((0 + 1 + 0.2) / 3)
    assert d["rmse"] == pytest.approx(np.sqrt((0 + 1 + 1) / 3))


# -- fine-tuning ----------------------------------------------------------------------------------------------------
def untrained_score(plan, cfg, task_name, metric):
    task = TransferTask(plan, getattr(cfg.transfer, task_name), None, cfg.transfer.seed, 0)
    torch.manual_seed(cfg.transfer.seed)
    model = task.build()
    return evaluate(model, task_name, task._loader("val"), plan.classes, torch.device("cpu"))[metric]


@pytest.fixture(scope="module")
def classification(ray_address, tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    train, val = classification_folders(root / "colours")
    model = tiny_fourm(root / "fourm")
    cfg = config("classification", epochs=8, base_lr=0.5, randaugment=None, mixup=0.0, cutmix=0.0)
    on_a_worker = cfg.model_copy(update={"transfer": cfg.transfer.model_copy(update={"workers": 1})})  # not in process
    return root, train, val, model, cfg, run_transfer("classification", train, val, on_a_worker, model=str(model))


def test_a_short_classification_fine_tune_beats_an_untrained_head(classification):
    root, train, val, model, cfg, results = classification
    plan = make_transfer_plan("classification", train, val, str(model), None, cfg, 1)
    assert plan.class_names == sorted(COLOURS) and plan.steps == 8 * 6
    before = untrained_score(plan, cfg, "classification", "top1")
    assert results["metrics"]["top1"] >= 75 > before + 25  # 4 classes: an untrained head is near chance
    assert results["paper"]["4M-B"] == 84.5 and (model / "transfer-classification" / "model.safetensors").is_file()
    assert (model / "transfer-classification" / "ray").is_dir()  # trained by a Ray Train worker: its run state
    log = [json.loads(line) for line in (model / "transfer-classification" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] and "val_top5" in log[-1]
    assert log[-1]["val_loss"] < log[0]["loss"]  # the validation loss beside the scores, at each evaluation


def test_a_stopped_fine_tune_resumes_to_the_same_weights(classification, tmp_path):
    root, train, val, model, cfg, _ = classification
    # stopped and resumed in this process (Ray Train's local mode, the demo profile's) against the run on a worker
    assert cfg.transfer.workers == 0
    stopped = run_transfer("classification", train, val, cfg, model=str(model), out=tmp_path / "again", stop_after=5)
    assert stopped == {"stopped_at": 5, "steps": 48}
    run_transfer("classification", train, val, cfg, model=str(model), out=tmp_path / "again")
    straight = load_file(model / "transfer-classification" / "model.safetensors")
    resumed = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def fine_tune_here(task_name, train, val, model, cfg, backbone=None, steps=None):
    """The same task on the same loop, in this process (no Ray): a quick check of a task's data and head."""
    plan = make_transfer_plan(task_name, train, val, model, backbone, cfg, 1)
    if steps:
        plan.steps = steps
    folder = train.parent / f"run-{task_name}-{backbone}"
    folder.mkdir()
    s = getattr(cfg.transfer, task_name)
    task = TransferTask(plan, s, folder, cfg.transfer.seed, 0)
    train_loop(task, LoopSettings(name=task_name, steps=plan.steps, warmup_steps=plan.warmup_steps, peak_lr=plan.lr,
                                  samples_per_step=plan.local_batch, log_every=plan.steps, device="cpu"),
               folder, 0, 1)
    return plan, [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_segmentation_fine_tune_beats_an_untrained_head(tmp_path):
    root = segmentation_folder(tmp_path / "ade")
    cfg = config("segmentation", epochs=10, base_lr=0.5, classes=2, scale_jitter=[0.8, 1.25])
    model = str(tiny_fourm(tmp_path / "fourm"))
    plan, log = fine_tune_here("segmentation", root, root, model, cfg)
    assert log[-1]["val_miou"] > untrained_score(plan, cfg, "segmentation", "miou") + 10
    assert 0 < log[-1]["val_pixel_accuracy"] <= 100


def test_depth_fine_tune_beats_an_untrained_head(tmp_path):
    train, val = depth_folder(tmp_path / "nyu" / "train", range(6)), depth_folder(tmp_path / "nyu" / "val", range(6, 8))
    cfg = config("depth", epochs=10, base_lr=0.5)
    model = str(tiny_fourm(tmp_path / "fourm"))
    plan, log = fine_tune_here("depth", train, val, model, cfg)
    assert log[-1]["val_delta1"] > untrained_score(plan, cfg, "depth", "delta1") + 20
    assert log[-1]["val_abs_rel"] < 0.5 and log[-1]["val_rmse"] > 0


def test_a_timm_backbone_is_the_baseline_on_the_same_command(tmp_path):
    import timm

    train, val = classification_folders(tmp_path / "colours")
    checkpoint = tmp_path / "vit.pth"  # a local timm checkpoint, as a user's MAE weights would be
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=SIZE).state_dict(), checkpoint)
    cfg = config("classification", epochs=1, randaugment=None, mixup=0.8, cutmix=1.0)
    backbone = make_backbone(str(checkpoint), "timm:vit_tiny_patch16_224", 0.0, SIZE)
    assert backbone(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 16, 192)  # the [CLS] token left out
    assert all(torch.equal(a, b) for a, b in zip(backbone.model.state_dict().values(),
                                                  torch.load(checkpoint).values()))
    plan, log = fine_tune_here("classification", train, val, str(checkpoint), cfg, backbone="timm:vit_tiny_patch16_224",
                               steps=2)
    assert plan.backbone == "timm:vit_tiny_patch16_224" and np.isfinite(log[-1]["loss"]) and "val_top1" in log[-1]


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_fails_before_training_naming_the_file(tmp_path):
    model = str(tiny_fourm(tmp_path / "fourm"))
    train, val = classification_folders(tmp_path / "colours")
    (train / "purple").mkdir()
    with pytest.raises(TransferInputError, match="purple: an empty class folder"):
        make_transfer_plan("classification", train, val, model, None, config(), 1)
    root = segmentation_folder(tmp_path / "ade")
    with pytest.raises(TransferInputError, match=r"ADE_\d\.png: class id 2 beyond the head's 1 classes"):
        make_transfer_plan("segmentation", root, root, model, None, config("segmentation", classes=1), 1)
    nyu = depth_folder(tmp_path / "nyu", range(2))
    save_png(nyu / "depth" / "1.png", np.ones((10, 10), np.uint16))
    with pytest.raises(TransferInputError, match=r"depth/1.png: depth 10x10 for an image of 64x64"):
        make_transfer_plan("depth", nyu, nyu, model, None, config("depth"), 1)
    with pytest.raises(BackboneError, match="no 4M model"):
        make_transfer_plan("depth", nyu, nyu, str(tmp_path), None, config("depth"), 1)
    with pytest.raises(BackboneError, match="needs --model DIR"):
        run_transfer("depth", nyu, nyu, config("depth"))


def test_the_command_runs_a_linear_probe_that_leaves_the_backbone_as_it_was(classification, tmp_path, capsys):
    from pipeline.cli import main as cli

    root, train, val, model, cfg, _ = classification
    settings = json.dumps({**TASK, "epochs": 2, "base_lr": 0.5, "randaugment": None, "mixup": 0.0, "cutmix": 0.0})
    code = cli(["transfer", "--task", "classification", "--train", str(train), "--val", str(val), "--model", str(model),
                "--out", str(tmp_path / "probe"), "--linear-probe", "--profile", "demo",
                *[arg for s in [*SETTINGS, f"transfer.classification={settings}"] for arg in ("--set", s)]])
    assert code == 0
    out = capsys.readouterr().out
    assert "classification transfer of fourm: top1" in out and "4M-B 84.5" in out and str(tmp_path / "probe") in out
    probed = load_file(tmp_path / "probe" / "model.safetensors")
    encoder = FourMViT.from_fourm(FourM.from_pretrained(model)).state_dict()
    assert all(torch.equal(probed[f"backbone.{k}"], v) for k, v in encoder.items())  # frozen
    assert probed["head.fc.weight"].abs().max() > 100 * 2e-5  # the head, initialised at std 2e-5, trained


def test_each_task_keeps_its_papers_settings_when_one_is_changed():
    paper = load_config("paper", ["transfer.depth.epochs=10"]).transfer
    assert (paper.classification.batch_size, paper.classification.mixup, paper.classification.cutmix,
            paper.classification.label_smoothing, paper.classification.randaugment) == (4096, 0.1, 1.0, 0.1,
                                                                                        "rand-m9-mstd0.5")
    assert (paper.segmentation.image_size, paper.segmentation.batch_size, paper.segmentation.classes) == (512, 64, 150)
    assert paper.segmentation.base_lr * 64 / 256 == pytest.approx(2e-4)  # Table 8's learning rate at its batch
    assert (paper.depth.image_size, paper.depth.epochs, paper.depth.batch_size, paper.depth.weight_decay) == \
        (256, 10, 128, 1e-4)  # the one change, the rest Table 9's


def test_status_lists_the_finished_transfers_of_the_datasets_model(classification, tmp_path, capsys):
    import shutil

    from pipeline.cli import main as cli

    root, _, _, model, _, results = classification
    data = tmp_path / "data"  # a dataset whose model was the one fine-tuned
    shutil.copytree(model, data / "pretrain")
    assert cli(["status", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "transfer classification" in out and f"top1 {results['metrics']['top1']:.4g}" in out
    assert "paper 4M-B top1 84.5" in out
