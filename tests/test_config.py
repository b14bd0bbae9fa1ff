"""Tests for diffalign.config: YAML + overrides -> validated dataclasses, errors that name their keys."""

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from diffalign.config import (
    RESOLVED_CONFIG_NAME,
    ConfigError,
    EvalConfig,
    LoraConfig,
    OptimConfig,
    TrainerConfig,
    config_to_dict,
    describe_config,
    field_docs,
    load_config,
    save_config,
)


MINIMAL = {"model": {"path": "org/tiny-sd3"}}


@dataclasses.dataclass(kw_only=True)
class SamplingConfig:
    group_size: int = 4
    """Images per prompt."""
    batch_size: int = 8
    """Images per sampling batch."""


@dataclasses.dataclass(kw_only=True)
class ToyTrainerConfig(TrainerConfig):
    """A trainer config as a trainer would write one: new required field, new group, a redeclared default."""

    beta: float
    """KL coefficient."""
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    """Rollout sampling."""
    max_steps: int = 300
    """Optimizer steps of the toy trainer."""
    window: tuple[int, ...] = (0, 10)
    """Denoising step window."""
    validated: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampling.batch_size % self.sampling.group_size:
            raise ConfigError(
                "must divide sampling.batch_size: every prompt's group must fit in one batch",
                key="sampling.group_size",
            )

    def validate(self) -> None:
        self.validated = True


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(source=None, overrides=(), cls=TrainerConfig) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(cls, source, overrides)
    return info.value


# --- defaults and types --------------------------------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults():
    cfg = load_config(TrainerConfig, MINIMAL)
    assert cfg.model.path == "org/tiny-sd3"
    assert cfg.model.lora == LoraConfig() and not cfg.model.lora.enabled
    assert cfg.output_dir == Path("outputs") and cfg.mixed_precision == "no" and cfg.reward is None
    assert cfg.optim.betas == (0.9, 0.999) and cfg.gradient_checkpointing is False


def test_missing_required_key_is_named():
    err = error_of(None)
    assert [str(issue) for issue in err.issues] == ["model.path: missing required key"]


def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model: {path: m}
        max_steps: 1e3
        optim: {lr: 1e-4, eps: 1.0e-6, weight_decay: 5E-3}
        """,
    )
    cfg = load_config(TrainerConfig, path)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.eps == pytest.approx(1e-6) and cfg.optim.weight_decay == pytest.approx(5e-3)
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    cfg = load_config(TrainerConfig, path, ["optim.lr=3e-5", "optim.max_grad_norm=1e1"])
    assert cfg.optim.lr == pytest.approx(3e-5) and cfg.optim.max_grad_norm == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"optim": {"lr": "fast"}}, "optim.lr: expected float, got 'fast' (str)"),
        ({"optim": {"lr": "1e-4"}}, "optim.lr: expected float, got '1e-4' (str); remove the quotes"),
        ({"seed": 1.5}, "seed: expected int, got 1.5 (float)"),
        ({"seed": True}, "seed: expected int, got True (bool)"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing: expected bool, got 1 (int)"),
        ({"logging": {"project": 12}}, "logging.project: expected str, got 12 (int); quote the value"),
        ({"optim": {"betas": [0.9]}}, "optim.betas: expected 2 items (tuple[float, float]), got 1"),
        ({"eval": {"seeds": [1, "two"]}}, "eval.seeds[1]: expected int, got 'two' (str)"),
        ({"model": {"path": "m", "lora": {"target_modules": "to_q"}}}, "model.lora.target_modules: expected list"),
        ({"optim": 3}, "optim: expected mapping (OptimConfig), got 3 (int)"),
        ({"output_dir": 5}, "output_dir: expected path, got 5 (int)"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(raw, expected):
    err = error_of({**MINIMAL, **raw})
    assert len(err.issues) == 1
    assert str(err.issues[0]).startswith(expected)


def test_booleans_are_strict_true_or_false(tmp_path):
    path = write_yaml(tmp_path, "model: {path: m}\ngradient_checkpointing: yes\n")
    assert "gradient_checkpointing: expected bool, got 'yes' (str)" in str(error_of(path))
    path.write_text("model: {path: m}\ngradient_checkpointing: true\n")
    assert load_config(TrainerConfig, path).gradient_checkpointing is True


def test_literal_error_lists_the_choices_and_suggests():
    err = error_of({**MINIMAL, "mixed_precision": "bf61"})
    assert str(err) == "mixed_precision: expected one of 'no', 'fp16', 'bf16', got 'bf61' (str) (did you mean 'bf16'?)"


def test_paths_and_integral_floats_are_coerced():
    cfg = load_config(TrainerConfig, {**MINIMAL, "output_dir": "runs/a", "eval": {"prompts": "p.txt"}})
    assert cfg.output_dir == Path("runs/a") and cfg.eval.prompts == Path("p.txt")
    assert load_config(TrainerConfig, MINIMAL, ["eval.prompts=[a cat, a dog]"]).eval.prompts == ["a cat", "a dog"]


def test_an_empty_yaml_section_means_defaults(tmp_path):
    path = write_yaml(tmp_path, "model: {path: m}\noptim:\n  # lr: 1e-3\n")
    assert load_config(TrainerConfig, path).optim == OptimConfig()


def test_dataclass_instances_are_accepted_in_dict_sources():
    cfg = load_config(TrainerConfig, {**MINIMAL, "optim": OptimConfig(lr=0.5)}, ["optim.eps=1e-3"])
    assert cfg.optim.lr == 0.5 and cfg.optim.eps == pytest.approx(1e-3)


# --- unknown keys ----------------------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_close_one():
    err = error_of({**MINIMAL, "seeed": 1})
    assert str(err) == "seeed: unknown key (did you mean 'seed'?)"


def test_unknown_nested_key_names_the_dotted_path():
    err = error_of({**MINIMAL, "optim": {"lrr": 1e-4}})
    assert str(err) == "optim.lrr: unknown key (did you mean 'optim.lr'?)"


def test_key_in_the_wrong_group_points_to_the_right_place():
    assert "lr: unknown key (did you mean 'optim.lr'?)" in str(error_of({**MINIMAL, "lr": 1e-4}))
    err = error_of({**MINIMAL, "every": 5})
    assert "did you mean 'checkpoint.every' or 'eval.every'?" in str(err)


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    err = error_of({**MINIMAL, "ema": {"xyz": 1}})
    assert str(err) == "ema.xyz: unknown key (valid keys: enabled, decay, update_every)"


# --- overrides -------------------------------------------------------------------------------------------------


def test_overrides_set_scalars_lists_and_null(tmp_path):
    path = write_yaml(tmp_path, "model: {path: m}\nlogging: {run_name: first}\n")
    cfg = load_config(
        TrainerConfig, path, ["seed=7", "eval.seeds=[1, 2]", "logging.run_name=null", "model.lora.rank=16"]
    )
    assert cfg.seed == 7 and cfg.eval.seeds == [1, 2] and cfg.logging.run_name is None
    assert cfg.model.lora.rank == 16 and cfg.model.lora.effective_alpha == 16


def test_later_overrides_win_and_text_after_a_hash_stays_text():
    cfg = load_config(TrainerConfig, MINIMAL, ["seed=1", "seed=2", "logging.run_name=#3"])
    assert cfg.seed == 2 and cfg.logging.run_name == "#3"


def test_mapping_override_merges_into_a_group_but_replaces_a_dict_field():
    source = {**MINIMAL, "optim": {"lr": 0.5, "eps": 1e-6}, "reward": {"hps": 2.0}}
    cfg = load_config(TrainerConfig, source, ["optim={lr: 1e-3}", "reward={pickscore: 1.0, aesthetic: 0.5}"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.eps == pytest.approx(1e-6)
    assert cfg.reward == {"pickscore": 1.0, "aesthetic": 0.5}


def test_dotted_override_into_a_dict_field():
    cfg = load_config(
        TrainerConfig, {**MINIMAL, "reward": {"pickscore": 1.0, "aesthetic": 0.5}}, ["reward.pickscore=0.7"]
    )
    assert cfg.reward == {"pickscore": 0.7, "aesthetic": 0.5}
    # From a single reward name, a dotted key starts a fresh mapping.
    assert load_config(TrainerConfig, {**MINIMAL, "reward": "hps"}, ["reward.clip=1"]).reward == {"clip": 1.0}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr", "optim.lr: malformed override 'optim.lr': expected KEY=VALUE"),
        ("=3", "malformed override '=3'"),
        ("optim..lr=3", "optim..lr: malformed override"),
        ("optim.lrr=1e-4", "optim.lrr: unknown key (did you mean 'optim.lr'?) (in override 'optim.lrr=1e-4')"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast' (str) (from override 'optim.lr=fast')"),
        ("seed.value=3", "seed: int has no sub-keys; set the value as a whole: seed=VALUE"),
        ("optim.betas=[0.9,", "optim.betas: cannot parse override value '[0.9,' as YAML"),
        (
            "reward.pickscore=high",
            "reward.pickscore: expected float or dict[str, Any], got 'high' (str) (from override",
        ),
    ],
)
def test_bad_override_names_the_key(override, expected):
    err = error_of(MINIMAL, [override])
    assert len(err.issues) == 1
    assert expected in str(err)


def test_overrides_must_be_a_list_not_a_string():
    with pytest.raises(TypeError, match="sequence"):
        load_config(TrainerConfig, MINIMAL, "seed=1")


# --- reward union ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reward",
    [
        "pickscore",
        "hpsv2.1",
        "my_pkg.rewards:score",
        "rewards/my_reward.py:score",
        {"pickscore": 1, "clip": 0.5},
        "remote:http://127.0.0.1:8000",
        {"remote:http://gpu-a:8000,http://gpu-b:8000": 1.0, "aesthetic": 0.5},
    ],
)
def test_reward_accepts_a_name_a_spec_or_weights(reward):
    cfg = load_config(TrainerConfig, {**MINIMAL, "reward": reward})
    assert cfg.reward == reward
    if isinstance(reward, dict):
        assert all(isinstance(weight, float) for weight in cfg.reward.values())


@pytest.mark.parametrize(
    ("reward", "expected"),
    [
        (3, "reward: expected str or dict[str, float or dict[str, Any]] or null, got 3 (int)"),
        ({"pickscore": "high"}, "reward.pickscore: expected float or dict[str, Any], got 'high' (str)"),
        ({}, "reward: is an empty mapping"),
        ("two words", "reward: 'two words' is not a reward name"),
        ("module:", "reward: 'module:' is not a reward name"),
        ({"pkg:fn()": 1.0}, "reward.pkg:fn(): 'pkg:fn()' is not a reward name"),
        ({"clip": float("nan")}, "reward.clip: weight must be a finite number, got nan"),
        ("remote:ftp://host:8000", "reward: reward server URL 'ftp://host:8000' must look like http://host:port"),
        ({"remote:": 1.0}, "reward.remote:: reward server URL '' must look like http://host:port"),
    ],
)
def test_bad_reward_names_the_key(reward, expected):
    assert str(error_of({**MINIMAL, "reward": reward})).startswith(expected)


FLOW_GRPO_PICKSCORE = {"weight": 1.0, "scale": 0.038461538461538464}  # PickScore / 26, as flow_grpo scores it


def test_reward_accepts_term_mappings_mixed_with_weights_and_round_trips(tmp_path):
    reward = {
        "pickscore": {**FLOW_GRPO_PICKSCORE, "path": "/models/PickScore_v1", "revision": "main", "dtype": "bf16"},
        "aesthetic": 0.5,
        "imagereward": {"weight": 2, "shift": 0.5, "device": "cuda:1"},  # a device need not exist at config time
        "clip_score": {"scale": 0.01, "options": {"scale": 2.5, "clamp": True}},  # the factory's own scale
        "my_pkg.rewards:score": {"anything": 1},  # a custom spec's options are checked when it loads
    }
    cfg = load_config(TrainerConfig, {**MINIMAL, "reward": reward})
    assert cfg.reward == reward
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(TrainerConfig, saved).reward == reward


def test_a_single_reward_takes_options_as_a_one_entry_mapping():
    cfg = load_config(TrainerConfig, {**MINIMAL, "reward": {"pickscore": {"scale": 0.038461538461538464}}})
    assert cfg.reward == {"pickscore": {"scale": 0.038461538461538464}}


def test_dotted_override_into_a_reward_term():
    source = {**MINIMAL, "reward": {"pickscore": dict(FLOW_GRPO_PICKSCORE), "aesthetic": 0.5}}
    cfg = load_config(TrainerConfig, source, ["reward.pickscore.weight=0.25", "reward.aesthetic.dtype=bf16"])
    assert cfg.reward == {"pickscore": {"weight": 0.25, "scale": 0.038461538461538464}, "aesthetic": {"dtype": "bf16"}}


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ({"weight": "high"}, "reward.pickscore.weight: must be a finite number, got 'high'"),
        ({"weight": True}, "reward.pickscore.weight: must be a finite number, got True"),
        ({"scale": float("inf")}, "reward.pickscore.scale: must be a finite number, got inf"),
        ({"scale": 0}, "reward.pickscore.scale: must not be 0; to log a reward without training on it use weight: 0"),
        ({"shift": None}, "reward.pickscore.shift: must be a finite number, got None"),
        ({"pth": "/m"}, "reward.pickscore.pth: reward 'pickscore' does not take option 'pth'. Did you mean 'path'?"),
        ({"revison": "v1"}, "reward.pickscore.revison: reward 'pickscore' does not take option 'revison'. Did you"),
        ({"options": {"tokenizer": "/t"}}, "reward.pickscore.options.tokenizer: reward 'pickscore' does not take"),
        ({"options": ["path"]}, "reward.pickscore.options: must be a mapping of factory options, got ['path']"),
        ({"path": "/a", "options": {"path": "/b"}}, "reward.pickscore.options.path: is also given as pickscore.path"),
        ({"device": "gpu0"}, "reward.pickscore.device: 'gpu0' is not a device; use e.g. cpu, cuda or cuda:1"),
        ({"dtype": "bf17"}, "reward.pickscore.dtype: unknown dtype 'bf17'; use one of"),
    ],
)
def test_bad_reward_term_names_the_key(term, expected):
    assert str(error_of({**MINIMAL, "reward": {"pickscore": term}})).startswith(expected)


def test_unknown_option_error_lists_the_factory_options_and_the_term_keys():
    message = str(error_of({**MINIMAL, "reward": {"clip_score": {"clmap": True}}}))
    assert "Did you mean 'clamp'?" in message
    assert "['path', 'tokenizer_path', 'scale', 'clamp', 'revision', 'model', 'pretrained']" in message
    assert "also takes weight, scale, shift, device, dtype, options" in message


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_checking_reward_options_loads_no_model_library():
    """Options are checked against the factory's signature: transformers and open_clip stay unimported."""
    code = (
        "import sys\n"
        "from diffalign.config import TrainerConfig, load_config\n"
        "reward = {'pickscore': {'path': '/m', 'dtype': 'bf16'}, 'hpsv2.1': {'model': 'ViT-H-14'}}\n"
        "load_config(TrainerConfig, {'model': {'path': 'x'}, 'reward': reward})\n"
        "heavy = [m for m in ('transformers', 'open_clip', 'huggingface_hub') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- cross-field checks ----------------------------------------------------------------------------------------


def test_cross_field_check_in_a_group_gets_the_group_prefix():
    err = error_of({**MINIMAL, "optim": {"warmup_steps": 10}})
    assert err.issues[0].keys == ("optim.warmup_steps", "optim.lr_scheduler")
    assert str(err).startswith("optim.warmup_steps, optim.lr_scheduler: warmup_steps > 0 has no effect")
    assert "use lr_scheduler = constant_with_warmup" in str(err)


def test_cross_field_check_two_groups_deep():
    err = error_of({"model": {"path": "m", "lora": {"rank": -1}}})
    assert str(err) == "model.lora.rank: must be >= 0 (0 = full fine-tuning), got -1"


def test_cross_field_check_across_groups_at_the_top():
    err = error_of({**MINIMAL, "max_steps": 5, "optim": {"warmup_steps": 10, "lr_scheduler": "cosine"}})
    assert err.issues[0].keys == ("optim.warmup_steps", "max_steps")


def test_cross_field_check_blames_the_override_that_caused_it():
    err = error_of(MINIMAL, ["eval.every=100"])
    assert str(err).startswith("eval.prompts, eval.every: every > 0 needs prompts")
    assert str(err).endswith("(from override 'eval.every=100')")


def test_direct_construction_runs_the_same_checks_without_prefix():
    with pytest.raises(ConfigError) as info:
        EvalConfig(every=10)
    assert info.value.issues[0].keys == ("prompts", "every")


def test_subclassed_trainer_config_checks_and_validate_hook():
    err = error_of({**MINIMAL, "beta": 0.1, "sampling": {"group_size": 3}}, cls=ToyTrainerConfig)
    assert str(err).startswith("sampling.group_size: must divide sampling.batch_size")
    assert "beta: missing required key" in str(error_of(MINIMAL, cls=ToyTrainerConfig))
    cfg = load_config(ToyTrainerConfig, {**MINIMAL, "beta": 0.1}, ["window=[2, 4, 6]"])
    assert cfg.max_steps == 300 and cfg.window == (2, 4, 6) and cfg.validated


# --- collecting errors, files ----------------------------------------------------------------------------------


def test_all_errors_of_a_file_are_collected_in_one_error(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model: {pathh: m}
        seed: one
        optim: {lr: fast, warmup: 3}
        mixed_precision: fp32
        """,
    )
    err = error_of(path, ["ema.decay=2.0"])
    text = str(err)
    assert text.startswith(f"invalid config {path} (7 errors):")
    for key in ("model.pathh", "model.path", "seed", "optim.lr", "optim.warmup", "mixed_precision", "ema.decay"):
        assert f"  - {key}: " in text
    assert err.source == str(path) and len(err.issues) == 7


def test_file_problems_are_config_errors(tmp_path):
    assert "config file not found" in str(error_of(tmp_path / "missing.yaml"))
    assert f"cannot read config file {tmp_path}" in str(error_of(tmp_path))
    path = write_yaml(tmp_path, "model: {path: m}\nseed: [1\n")
    assert str(error_of(path)).startswith(f"invalid config {path}: not valid YAML")
    path.write_text("- 1\n- 2\n")
    assert "the top level must be a mapping" in str(error_of(path))
    path.write_text("model: {path: m}\nseed: 1\nseed: 2\n")
    err = str(error_of(path))
    assert "duplicate key 'seed'" in err and "line 3" in err


def test_empty_file_gives_defaults_and_needs_the_model(tmp_path):
    path = write_yaml(tmp_path, "")
    assert str(error_of(path)) == f"invalid config {path}: model.path: missing required key"
    assert load_config(TrainerConfig, path, ["model.path=m"]).model.path == "m"


# --- save and round trip ---------------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(
        ToyTrainerConfig,
        {
            "model": {"path": "org/m", "revision": "1e5", "lora": {"rank": 8, "target_modules": ["to_q", "to_v"]}},
            "beta": 1e-8,
            "reward": {"pickscore": 1.0, "rewards/r.py:fn": 0.25},
            "output_dir": str(tmp_path / "run"),
            "logging": {"run_name": "yes"},
            "eval": {"every": 10, "prompts": ["a red circle"]},
            "optim": {"betas": [0.8, 0.95]},
        },
    )
    path = save_config(cfg)
    assert path == tmp_path / "run" / RESOLVED_CONFIG_NAME
    loaded = load_config(ToyTrainerConfig, path)
    assert loaded == cfg
    assert loaded.model.revision == "1e5" and loaded.logging.run_name == "yes"  # strings stay strings
    keys = list(yaml.safe_load(path.read_text()))
    assert keys == [f.name for f in dataclasses.fields(ToyTrainerConfig) if f.init]


def test_config_to_dict_is_plain_yaml():
    plain = config_to_dict(load_config(TrainerConfig, MINIMAL))
    assert plain["output_dir"] == "outputs" and plain["optim"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


# --- help text -------------------------------------------------------------------------------------------------


def test_field_docs_come_from_attribute_docstrings_including_inherited():
    docs = field_docs(LoraConfig)
    assert list(docs)[:2] == ["rank", "alpha"]
    assert docs["rank"].startswith("LoRA rank r; 0 trains every denoiser weight")
    toy = field_docs(ToyTrainerConfig)
    assert toy["beta"] == "KL coefficient." and toy["max_steps"] == "Optimizer steps of the toy trainer."
    assert toy["seed"] == field_docs(TrainerConfig)["seed"]


def test_describe_config_lists_dotted_keys_types_defaults_and_docs():
    text = describe_config(ToyTrainerConfig)
    lines = text.splitlines()
    assert "  model.path: str  (required)" in lines
    assert "    model.lora.rank: int = 0" in lines
    assert "        LoRA rank r; 0 trains every denoiser weight (full fine-tuning, which needs a frozen" in text
    assert "mixed_precision: one of 'no', 'fp16', 'bf16' = 'no'" in lines
    assert "  optim.lr: float = 0.0001" in lines
    assert "beta: float  (required)" in lines and "    KL coefficient." in lines
    assert "  sampling.group_size: int = 4" in lines
    assert "validated" not in text  # init=False fields are not settable, so not listed
