"""The stage table is the one list of stages: the CLI, the config, the pipeline and the run folder agree with it."""

import dataclasses

from click.testing import CliRunner

from edgeclr import config, pipeline, stages
from edgeclr.cli import cli


def test_every_stage_names_a_config_class_and_a_function_that_exist():
    from edgeclr import bench, compress, deploy, distill, evaluate, export, report, train

    mains = {"train": train.main, "distill": distill.main, "compress": compress.main, "export": export.main,
             "eval": evaluate.main, "bench": bench.main, "deploy": deploy.main, "report": report.write}
    for s in stages.STAGES:
        assert pipeline.stage_main(s.name) is mains[s.name], s.name
        if s.config:
            assert config.stage_config(s.name) is getattr(config, s.config) and dataclasses.is_dataclass(config.stage_config(s.name))
        assert s.outputs, s.name
    assert stages.NAMES == ("train", "distill", "compress", "export", "eval", "bench", "deploy", "report")
    assert stages.MODEL_STAGES == ("train", "distill", "compress")


def test_the_cli_config_and_pipeline_derive_their_stage_lists_from_the_table():
    out = CliRunner().invoke(cli, ["pipeline", "--help"], terminal_width=200).output
    assert "[train|distill|compress|export|eval|bench|deploy|report]" in out.replace("\n", "")
    fields = {f.name: f for f in dataclasses.fields(config.PipelineConfig)}
    assert fields["from_stage"].metadata["choices"] == stages.NAMES == fields["until"].metadata["choices"]
    assert config.PIPELINE_SECTIONS == stages.SECTIONS
    assert all(s in fields for s in stages.SECTIONS)  # a section of options per configurable stage
    assert pipeline.STAGES == stages.NAMES and set(pipeline.RUNNERS) == set(stages.NAMES)


def test_get_names_the_valid_stages_for_an_unknown_one():
    try:
        stages.get("prune")
    except KeyError as e:
        assert "train, distill" in str(e)
    else:
        raise AssertionError("no error")
