"""The typed settings model (pyrefusal.settings) and the click options generated from it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pyrefusal.cli import main, settings_from_options
from pyrefusal.errors import PyrefusalError
from pyrefusal.settings import (
    CONDITIONS,
    QuantSweepConfig,
    QuantSweepSettings,
    RunConfig,
    RunSettings,
    TransferConfig,
    TransferSettings,
    parse_language_openings,
)

# config.json keys, in order, as the config classes before the settings model wrote them.
OLD_KEYS = {
    RunSettings: "model data_dir source_lang target_langs n_train n_val n_test max_new_tokens seed conditions "
    "filter_train filter_val kl_threshold prune_fraction steering_filter selection_mode refusal_openings system_prompt "
    "prompt_format detector judge judge_model judge_translator capability capability_texts direction_projection "
    "steering n_ctx n_seq_max n_gpu_layers n_threads",
    TransferSettings: "model data_dir sources targets n_train n_val n_test max_new_tokens seed kl_threshold "
    "prune_fraction steering_filter condition detector filter system_prompt prompt_format token_method n_token_probe "
    "token_max_new_tokens refusal_openings keep_activations random_control n_ctx n_seq_max n_gpu_layers n_threads",
    QuantSweepSettings: "model types allow_requantize data_dir source_lang n_train n_val n_test max_new_tokens seed "
    "positions kl_threshold prune_fraction filter detector work_dir n_ctx n_seq_max n_threads",
}
# The per-study resume rules before they were declared on the fields.
OLD_RESUMABLE = {
    RunSettings: {
        "judge",
        "judge_model",
        "judge_translator",
        "capability",
        "n_threads",
        "n_gpu_layers",
        "n_ctx",
        "target_langs",
        "conditions",
    },
    TransferSettings: {"sources", "targets", "random_control", "n_threads", "n_gpu_layers", "n_ctx"},
    QuantSweepSettings: {"types", "work_dir", "n_ctx", "n_seq_max", "n_threads", "allow_requantize"},
}


def test_old_names_are_the_settings_classes() -> None:
    from pyrefusal.studies import quantsweep, run, transfer

    assert RunConfig is RunSettings is run.RunConfig
    assert TransferConfig is TransferSettings is transfer.TransferConfig
    assert QuantSweepConfig is QuantSweepSettings is quantsweep.QuantSweepConfig
    assert run.CONDITIONS == CONDITIONS
    assert CONDITIONS == ("baseline", "ablation", "actadd", "induce", "harm_ablation", "random_ablation")


@pytest.mark.parametrize("cls", [RunSettings, TransferSettings, QuantSweepSettings])
def test_to_dict_keeps_config_json_keys_and_round_trips(cls: type[RunSettings]) -> None:
    d = cls().to_dict()
    assert list(d) == OLD_KEYS[cls].split()
    assert cls.resumable_keys() == OLD_RESUMABLE[cls]
    text = json.dumps(d, indent=1)
    assert cls.from_dict(json.loads(text)) == cls()  # lists from config.json become tuples again
    assert json.dumps(cls.from_dict(json.loads(text)).to_dict(), indent=1) == text


def test_from_dict_reads_old_configs_and_refuses_foreign_keys() -> None:
    old = RunSettings(target_langs=("en",), conditions=("baseline",)).to_dict()
    del old["direction_projection"]  # written before the setting existed: its default
    assert RunSettings.from_dict(old) == RunSettings(target_langs=("en",), conditions=("baseline",))
    t = TransferSettings.from_dict({"refusal_openings": {"de": ["Ich", "Es"]}, "sources": ["de"]})
    assert t.refusal_openings == {"de": ("Ich", "Es")} and t.sources == ("de",)
    with pytest.raises(PyrefusalError, match="another study"):
        RunSettings.from_dict({"sources": ["en"]})


def test_presets() -> None:
    paper = RunSettings.preset("paper")
    assert (paper.n_train, paper.n_val, paper.n_test, paper.max_new_tokens) == (128, 32, 572, 512)
    assert paper.conditions == ("baseline", "ablation", "harm_ablation") and paper.prompt_format == "paper"
    assert RunSettings.preset("paper", n_test=50).n_test == 50
    assert RunSettings.preset("quick") == RunSettings()
    assert TransferSettings.preset("paper").n_train == 128 and QuantSweepSettings.preset("paper").n_test == 572
    with pytest.raises(PyrefusalError, match="unknown preset 'huge'"):
        RunSettings.preset("huge")


def test_literal_choices_are_validated_with_the_option_named() -> None:
    RunSettings().validate()
    TransferSettings().validate()
    for kw, msg in (
        ({"conditions": ("nope",)}, r"unknown conditions \['nope'\] \(--conditions\); choose from \['baseline'"),
        ({"direction_projection": "mean"}, r"direction_projection 'mean' \(--direction-projection\); choose 'none' or"),
        ({"judge": "gpt"}, r"\(--judge\); choose 'none', 'wildguard' or 'llama-guard-3'"),
        ({"prompt_format": "x"}, r"unknown prompt_format 'x' \(--prompt-format\)"),
        ({"steering": "x"}, r"unknown steering 'x'"),
        ({"detector": "x"}, r"unknown detector 'x'"),
        ({"n_seq_max": 0}, r"n_seq_max \(--n-seq\)"),
    ):
        with pytest.raises(PyrefusalError, match=msg):
            RunSettings(**kw).validate()  # type: ignore[arg-type]
    with pytest.raises(PyrefusalError, match=r"unknown condition 'nope' \(--condition\)"):
        TransferSettings(condition="nope").validate()  # type: ignore[arg-type]
    with pytest.raises(PyrefusalError, match=r"unknown token_method"):
        TransferSettings(token_method="x").validate()  # type: ignore[arg-type]


def test_option_names() -> None:
    names = RunSettings.option_names()
    assert names["n_seq_max"] == "--n-seq" and names["n_threads"] == "--threads"
    assert names["filter_train"] == names["filter_val"] == "--no-filter" and names["selection_mode"] == "--all-scores"
    assert names["n_test"] == "--n-test"
    assert parse_language_openings("de=Ich, Es;ja=申し訳;junk") == {"de": ("Ich", "Es"), "ja": ("申し訳",)}


# Every option the three commands had before their options were generated from the settings.
OLD_OPTIONS = {
    "run": "--model --data-dir --source-lang --target-langs --n-train --n-val --n-test --max-new-tokens --seed "
    "--conditions --kl-threshold --steering-filter --direction-projection --all-scores --no-filter --refusal-openings "
    "--system-prompt --prompt-format --detector --judge --judge-model --judge-translator --capability --steering "
    "--n-ctx --n-seq --n-gpu-layers --threads --out --force --preset",
    "transfer": "--model --data-dir --sources --targets --n-train --n-val --n-test --max-new-tokens --seed "
    "--kl-threshold --condition --detector --token-method --refusal-openings --prompt-format --random-control "
    "--threads --n-gpu-layers --out --force --no-plots",
    "quant-sweep": "--model --types --allow-requantize --data-dir --n-train --n-val --n-test --max-new-tokens "
    "--positions --seed --work-dir --threads --out --force",
}


@pytest.mark.parametrize("command", list(OLD_OPTIONS))
def test_generated_options_keep_every_flag(command: str) -> None:
    cmd = main.commands[command]
    opts = [o for p in cmd.params for o in p.opts if o not in ("-h", "--help")]
    old = OLD_OPTIONS[command].split()
    assert opts[: len(old)] == old  # every flag of before the restructure, in its order
    assert opts[len(old) :] == ["--ray", "--ray-workers"]  # added since (issue 14)
    out = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    for opt in OLD_OPTIONS[command].split():
        assert opt in out
    secondary = {o for p in cmd.params for o in p.secondary_opts}
    assert (
        secondary
        == {
            "run": {"--no-steering-filter", "--no-capability"},
            "transfer": {"--no-random-control"},
            "quant-sweep": set(),
        }[command]
    )
    data_dir = next(p for p in cmd.params if p.name == "data_dir")
    assert data_dir.envvar == "PYREFUSAL_DATA_DIR"


def test_options_map_to_fields_and_the_paper_preset_yields_to_explicit_ones(tmp_path) -> None:
    """Parse the options as `run` does (without running): flags, renames, lists and the preset."""
    import click

    seen: list[RunSettings] = []
    cmd = main.commands["run"]
    original = cmd.callback

    @click.pass_context
    def capture(ctx: click.Context, **kw: object) -> None:
        seen.append(settings_from_options(RunSettings, kw, ctx, preset=str(kw["preset"])))

    cmd.callback = capture
    try:
        args = ["run", "--no-filter", "--all-scores", "--n-seq", "4", "--threads", "2", "--target-langs", "en, de"]
        r = CliRunner().invoke(main, [*args, "--no-capability", "--conditions", "baseline"])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(main, ["run", "--preset", "paper", "--n-test", "3"], env={"PYREFUSAL_RUN_N_VAL": "5"})
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(main, ["run", "--judge", "gpt"])
        assert r.exit_code == 2 and "'gpt' is not one of" in r.output
    finally:
        cmd.callback = original
    plain, paper = seen
    assert plain == RunSettings(
        filter_train=False,
        filter_val=False,
        selection_mode="all",
        n_seq_max=4,
        n_threads=2,
        target_langs=("en", "de"),
        capability=False,
        conditions=("baseline",),
    )
    assert paper == RunSettings.preset("paper", n_test=3, n_val=5)  # explicit (also from the environment) wins
