"""One list of stages: the pipeline flow, status and the command line read their order and descriptions from it."""
from pipeline import flows
from pipeline.cli import build_parser
from pipeline.stage_list import STAGES, pipeline_stages, stage, status_rank


def test_the_pipeline_runs_the_lists_stages_in_its_order():
    assert list(flows.RUNNERS) == [s.name for s in pipeline_stages()]
    assert [s.name for s in pipeline_stages()] == ["download", "quality", "pseudo-label", "train-tokenizers",
                                                   "tokenize", "pretrain"]


def test_status_orders_status_folders_by_the_stage_that_records_them():
    folders = ["tokenize_rgb", "crop_settings", "label_semseg", "download", "align", "label_depth", "unknown"]
    ordered = sorted(folders, key=lambda f: (status_rank(f), f))
    assert ordered[:3] == ["download", "label_depth", "label_semseg"]
    assert set(ordered[3:6]) == {"align", "crop_settings", "tokenize_rgb"} and ordered[-1] == "unknown"


def test_the_command_line_describes_each_stage_command_from_the_list():
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0]._choices_actions}
    for s in STAGES:
        if s.in_pipeline and s.command in helps:
            assert s.summary in helps[s.command], (s.command, helps[s.command])
    assert stage("tokenize").command == "tokenize"
