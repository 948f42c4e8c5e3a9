import dataclasses
import re
import typing

import pytest

from dist_coop.config import SECTIONS, Config, config_from_dict, load_config, parse_overrides, save_config
from dist_coop.coop.task import build_task
from dist_coop.models import DepthLinear
from dist_coop.models.registry import build_from_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["--coop.alpha=0.5", "--train.epochs", "3", "--coop.scaling_factors=[0.25, 1]"])
    assert cfg.coop.alpha == 0.5 and cfg.train.epochs == 3
    assert cfg.coop.scaling_factors == (0.25, 1.0)
    assert isinstance(cfg.coop.scaling_factors[1], float)
    path = tmp_path / "exp.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again.coop == cfg.coop and again.train.run_name == "exp"  # run name from the file stem


def test_yaml_file_and_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: resnet56\ncoop:\n  alpha: 2\n")
    cfg = load_config(path, ["--coop.alpha=0.1"])
    assert cfg.model.name == "resnet56" and cfg.coop.alpha == 0.1


@pytest.mark.parametrize(
    "override, message",
    [
        ("--coop.alpah=1", r"unknown key coop\.alpah; did you mean 'alpha'"),
        ("--cop.alpha=1", r"unknown section 'cop'; did you mean 'coop'"),
        ("--coop.scaling_factors=[0.5, 1.5]", r"coop\.scaling_factors must be in \(0, 1\], got 1\.5"),
        ("--coop.scaling_factors=[0.0, 1.0]", r"coop\.scaling_factors must be in \(0, 1\], got 0\.0"),
        ("--coop.scaling_factors=[0.25, 0.5]", r"must include 1\.0"),
        ("--model.name=resnet7", r"model\.name: unknown model 'resnet7'; available: \["),
        ("--train.epochs=three", r"train\.epochs must be int, got str"),
        ("--coop.leader=yes please", r"coop\.leader must be true or false"),
        ("--optim.lr=-1", r"optim\.lr must be > 0"),
        ("--optim.amp=fp8", r"optim\.amp must be one of"),
        ("--coop.teammates=3", r"coop\.teammates must be one of \[1, 2\]"),
        ("--model.bn=group", r"model\.bn must be one of"),
        ("--model.head=per_depth", r"model\.head must be one of \['shared', 'private'\]"),
        ("--coop.scaling_factors=oops", r"coop\.scaling_factors must be a list of float"),
        ("--optim.lr=inf", r"optim\.lr must be finite, got inf"),
        ("--coop.scaling_factors=[.nan, 1.0]", r"coop\.scaling_factors must be finite, got nan"),
        ("--train.on_nonfinite=warn", r"train\.on_nonfinite must be one of \['error', 'skip'\]"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_beta_needs_leader():
    with pytest.raises(ValueError, match="coop.beta > 0 needs coop.leader"):
        load_config(None, ["--coop.leader=false"])
    assert load_config(None, ["--coop.leader=false", "--coop.beta=0"]).coop.leader is False


def test_private_head_goes_to_the_nets_that_train_several_depths():
    """model.head: private: a Teammate with sub-nets gets one classifier per depth; a net trained at one depth (the
    Leader, a net trained alone, a full-only Teammate) keeps one, or its other depths would read untrained rows."""

    def heads(*overrides):
        cfg = load_config(None, ["--model.head=private", *overrides])
        specs = build_task(cfg.coop).specs
        return {
            spec.name: isinstance(spec.build(cfg.model, cfg.coop.scaling_factors).backbone.fc, DepthLinear)
            for spec in specs
        }

    assert heads() == {"leader": False, "teammate_a": True, "teammate_b": True}
    assert not any(heads("--coop.sub_nets=false").values())
    assert not any(heads("--coop.task=independent").values()) and len(heads("--coop.task=independent")) == 4
    cfg = load_config(None, [])  # the default: one classifier
    assert not isinstance(build_from_config(cfg.model, cfg.coop.scaling_factors).backbone.fc, DepthLinear)


def test_yaml_is_plain_data(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="(?i)could not determine a constructor|constructor"):
        load_config(path)


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ValueError, match="config file not found"):
        load_config("nope.yaml")
    with pytest.raises(ValueError, match="--section.key=value"):
        parse_overrides(["alpha=1"])


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.coop.alpha = 3.0  # type: ignore[misc]
    assert cfg.flat()["coop.alpha"] == 1.0


def test_every_float_of_every_section_must_be_finite():
    """inf and nan pass range checks like ``> 0``; every float field (and float list) refuses them by name."""
    checked = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if hint is float or typing.get_args(hint)[:1] == (float,):
                for bad in (float("inf"), float("-inf"), float("nan")):
                    value = [bad, 1.0] if hint is not float else bad
                    with pytest.raises(ValueError, match=rf"^{section}\.{f.name} must be finite, got {bad}$"):
                        config_from_dict({section: {f.name: value}})
                checked.append(f"{section}.{f.name}")
    assert {"optim.lr", "coop.alpha", "coop.scaling_factors", "optim.milestones"} <= set(checked)
    assert load_config(None, ["--optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


def test_every_choice_list_is_the_fields_metadata_and_validation_reads_it():
    """Validation reads each setting's values from its field's metadata (a tuple of dist_coop.choices, or its own):
    every listed value loads, any other is refused naming the setting (and, where no function checks it, the
    values from that metadata)."""
    checked = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            choices = f.metadata["choices"]
            if not choices:
                continue
            for value in choices:
                if value != "cuda:N":  # a pattern: cuda:0, cuda:1, ...
                    assert getattr(getattr(config_from_dict({section: {f.name: value}}), section), f.name) == value
            bad = 7 if isinstance(choices[0], int) else "no-such-value"
            if f.metadata["check"] is None:
                expected = rf"^{section}\.{f.name} must be one of {re.escape(str(list(choices)))}, got"
            else:  # a function checks it (a model name, a device pattern); its message names the setting too
                expected = rf"^{section}\.{f.name}\b"
            with pytest.raises(ValueError, match=expected):
                config_from_dict({section: {f.name: bad}})
            checked.append(f"{section}.{f.name}")
    assert {"optim.amp", "coop.teammates", "dist.zero_stage", "train.device", "tracking.log_checkpoint"} <= set(checked)


def test_a_list_of_choices_is_held_once_and_each_user_of_it_names_it():
    """The config, its reference and the modules that implement a choice all read ``dist_coop.choices``: a bad
    value is refused with that list, by the config and by the module."""
    from dist_coop import choices
    from dist_coop.config_doc import settings
    from dist_coop.models.masks import active_blocks
    from dist_coop.models.registry import MODELS, build_backbone, build_model

    shown = {s.key: s.choices for section in SECTIONS for s in settings(section)}
    for key, values in {
        "model.name": choices.MODEL_NAMES,
        "model.keep": choices.KEEP_MODES,
        "model.gate": choices.GATE_MODES,
        "model.bn": choices.BN_MODES,
        "model.head": choices.HEAD_MODES,
        "coop.task": choices.TASKS,
    }.items():
        assert shown[key] is values, key
    assert tuple(MODELS) == choices.MODEL_NAMES
    with pytest.raises(ValueError, match=re.escape(str(sorted(choices.MODEL_NAMES)))):
        build_backbone("resnet7")
    with pytest.raises(ValueError, match=re.escape(str(list(choices.KEEP_MODES)))):
        active_blocks([3], 0.5, keep="middle")
    for option, values in (("gate", choices.GATE_MODES), ("bn", choices.BN_MODES), ("head", choices.HEAD_MODES)):
        with pytest.raises(ValueError, match=re.escape(str(list(values)))):
            build_model("resnet20", [1.0], width=2, **{option: "no-such-value"})


def test_a_removed_setting_loads_at_its_old_default_and_is_refused_otherwise(tmp_path):
    """A run's stored config lists every setting, model.leader_name ("") among them: it still loads. A value that
    asks for something is refused naming what to use instead."""
    stored = Config().to_dict()
    stored["model"]["leader_name"] = ""
    assert config_from_dict(stored) == Config()
    with pytest.raises(ValueError, match=r"^model\.leader_name is no longer a setting \(.*model\.leader_width\)"):
        load_config(None, ["--model.leader_name=resnet56"])
    with pytest.raises(ValueError, match=r"unknown key model\.leader_nam; did you mean 'leader_width'"):
        load_config(None, ["--model.leader_nam=resnet56"])


def test_no_section_repeats_a_choice_list_in_its_checks():
    """``_choice`` is called only by the metadata check: a ``__post_init__`` holding a list of values would be a
    second copy of them."""
    import ast
    import inspect

    from dist_coop import config

    for cls in SECTIONS.values():
        tree = ast.parse(inspect.getsource(cls))
        calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        assert "_choice" not in calls, cls.__name__
    assert "_choice" in inspect.getsource(config._check_fields)


def test_a_mapping_default_is_not_shared_between_configs():
    a, b = Config(), Config()
    assert a.dist.deepspeed_extra == {} and a.dist.deepspeed_extra is not b.dist.deepspeed_extra
