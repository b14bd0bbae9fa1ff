"""The ``diffalign`` command line.

::

    diffalign train CONFIG.yaml [key=value ...] [--resume DIR|latest|auto] [--overwrite]  # method from the config
    diffalign train CONFIG.yaml --help-config                            # every key, its type, default and help
    diffalign sample --model M [--lora DIR] --prompt P [--prompt P ...] --out image.png
    diffalign grid --model M [--lora DIR ...] --prompts FILE|--prompt P --seeds 0 1 [--reward NAME ...] --out grid.png
    diffalign score --reward NAME [--reward NAME ...] --images DIR|FILES --prompts FILE|--prompt P [--json PATH]
    diffalign pairs --model M --prompts FILE|--prompt P --reward SPEC --num-per-prompt K --out DIR
    diffalign bench rollout|backprop|grpo|learn|reward-server ...
    diffalign reward serve --reward NAME [--port 8000] [--device cuda:1] [--batch-size N] [--token T]  # HTTP server
    diffalign plan CONFIG.yaml [key=value ...] [--gpus N] [--gpu-memory 80GB] [--sharding ddp|fsdp2] [--json]
    diffalign export CHECKPOINT|RUN --out DIR                            # LoRA or pipeline folder; joins FSDP shards
    diffalign demo [demo options]

Several GPUs: ``accelerate launch -m diffalign.cli train CONFIG.yaml``. Errors print one line
(``diffalign: error: ...``) and exit with 2 (usage, config) or 1 (anything else); ``--debug`` (before or after
the subcommand) adds the traceback. Heavy libraries are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from diffalign import __version__
from diffalign.config import ConfigError


EXIT_RUNTIME, EXIT_USAGE = 1, 2

DTYPES = ("fp32", "fp16", "bf16")
COMPILE_CHOICES = ("none", "default", "max-autotune-no-cudagraphs")
"""``--compile`` modes: :data:`diffalign.adapters.base.COMPILE_MODES` (not imported here, to start without torch)."""


class UsageError(Exception):
    """A bad command line (argparse's errors, raised instead of printed so that ``main`` owns the output)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    # SUPPRESS keeps a subcommand from resetting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return common


def _model_options(parser: argparse.ArgumentParser, lora_help: str) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    parser.add_argument("--lora", action="append", default=[], metavar="DIR", help=lora_help)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="denoiser/text-encoder dtype (VAE: fp32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (SD3/FLUX)")


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="ODE denoising steps (default: 20)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: per family)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per denoiser batch (default: 8)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="none",
        choices=COMPILE_CHOICES,
        help="torch.compile the denoiser (alone: the default mode); the first batches compile, so it pays off on many",
    )


def _alignment_options(parser: argparse.ArgumentParser, several: bool) -> None:
    """Alignment at sampling time: RL guidance (``--alignment-scale``) and the noise search (``--best-of``)."""
    parser.add_argument(
        "--alignment-scale",
        type=float,
        nargs="+" if several else None,
        default=None,
        metavar="W",
        help="RL guidance: base + W * (LoRA - base) at every step (0 base, 1 the LoRA, >1 stronger; one more "
        "denoiser call per step)" + ("; several: one column group per LoRA and W" if several else ""),
    )
    parser.add_argument(
        "--negative-lora",
        default=None,
        metavar="DIR",
        help="a negative LoRA (a Self-NPO run or its lora/ folder) added to CFG's unconditional branch; the text "
        "branch runs without it (one more denoiser call per step)",
    )
    parser.add_argument(
        "--best-of",
        type=int,
        default=None,
        metavar="N",
        help="sample N starting noises per image and keep the one the (first) --reward scores best",
    )
    parser.add_argument(
        "--search-rounds",
        type=int,
        default=1,
        help="with --best-of: rounds of search, each later one around the best noise so far (default: 1)",
    )
    parser.add_argument(
        "--search-radius", type=float, default=0.5, help="with --search-rounds > 1: neighbour distance (default: 0.5)"
    )


def _noise_search(args: argparse.Namespace):
    """The :class:`~diffalign.eval.search.NoiseSearch` of ``--best-of`` (None without it)."""
    from diffalign.eval.search import NoiseSearch

    if args.best_of is None:
        if args.search_rounds != 1:
            raise UsageError("--search-rounds needs --best-of N")
        return None
    if not args.reward:
        raise UsageError("--best-of needs a --reward to choose the images by")
    try:
        return NoiseSearch(candidates=args.best_of, rounds=args.search_rounds, radius=args.search_radius)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _add_train(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="train with a YAML config (the method is read from it)")
    p.add_argument("config", nargs="?", help="YAML config with a 'method' key (grpo, diffusion_dpo, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-4")
    p.add_argument(
        "--resume",
        metavar="DIR|latest|auto",
        help="resume from a checkpoint folder, the newest one (latest), or the newest one if any (auto)",
    )
    p.add_argument("--overwrite", action="store_true", help="start afresh in an output_dir holding another run")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config changes seed, model, batch geometry or optimizer (diff is printed)",
    )
    p.add_argument("--help-config", action="store_true", help="list every config key of the method and exit")
    p.add_argument("--method", help="with --help-config and no CONFIG: the method to describe")
    p.set_defaults(handler=cmd_train)


def _add_sample(sub, common) -> None:
    p = sub.add_parser("sample", parents=[common], help="generate images (PNG)")
    _model_options(p, "LoRA folder to apply (a saved LoRA, a run folder or a checkpoint)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image of each prompt (default: 0)")
    p.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt, seeds seed, seed+1, ...")
    _sampling_options(p)
    _alignment_options(p, several=False)
    p.add_argument("--reward", action="append", default=[], help="with --best-of: the reward to choose by")
    p.add_argument("--out", required=True, help="PNG file (several images: a grid, rows = prompts) or a folder")
    p.set_defaults(handler=cmd_sample)


_FILE_HELP = "text file with one prompt per line (text that looks like no path: one prompt)"
_TEXT_HELP = "a prompt, taken as text (never read as a file); repeat for several"


def _prompt_options(parser: argparse.ArgumentParser, file_help: str = _FILE_HELP, text_help: str = _TEXT_HELP) -> None:
    """``--prompts FILE`` or ``--prompt TEXT`` (repeatable, never read as a file): exactly one of them."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompts", metavar="FILE", help=f"{file_help}; a missing file is an error")
    group.add_argument("--prompt", action="append", metavar="TEXT", help=text_help)


def _add_grid(sub, common) -> None:
    p = sub.add_parser("grid", parents=[common], help="evaluation grid: prompts x (models x seeds), scored")
    _model_options(p, "LoRA to compare with the base model; repeat for several columns")
    _prompt_options(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--reward", action="append", default=[], help="reward to caption the cells with; repeatable")
    p.add_argument("--no-base", action="store_true", help="leave out the base model's columns")
    p.add_argument("--cell-size", type=int, default=256, help="cell side in pixels (default: 256)")
    _sampling_options(p)
    _alignment_options(p, several=True)
    p.add_argument("--out", required=True, help="grid PNG; the scores go to the same name with .json")
    p.add_argument("--json", help="where the scores go instead of <out>.json")
    p.set_defaults(handler=cmd_grid)


def _add_score(sub, common) -> None:
    p = sub.add_parser("score", parents=[common], help="score image files with rewards")
    p.add_argument("--reward", action="append", required=True, help="reward name or module:fn; repeatable")
    p.add_argument("--images", nargs="+", required=True, help="a folder (sorted PNG/JPEG files) or files")
    _prompt_options(
        p,
        "file with one prompt per image, or one for all (text that looks like no path: the prompt for all)",
        "a prompt as text, for all images; or repeat it, once per image (sorted file order)",
    )
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--batch-size", type=int, default=16, help="images per reward call (default: 16)")
    p.add_argument("--device", default=None, help="where the rewards run (default: cuda if available)")
    p.set_defaults(handler=cmd_score)


def _add_pairs(sub, common) -> None:
    p = sub.add_parser("pairs", parents=[common], help="AI-feedback preference pairs: sample, rank with a reward")
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    _prompt_options(p)
    p.add_argument("--reward", required=True, help="reward spec ranking the samples")
    p.add_argument("--num-per-prompt", type=int, required=True, help="samples per prompt")
    p.add_argument("--out", required=True, help="output folder (images + pairs)")
    p.add_argument("--pairing", choices=("best_worst", "all"), default="best_worst")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: per family)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.set_defaults(handler=cmd_pairs)


def _add_bench(sub, common) -> None:
    from diffalign.bench import LEARN_METHODS  # light: the benchmarks import torch and the trainers lazily

    bench = sub.add_parser("bench", parents=[common], help="speed and memory benchmarks (printed)")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=_Parser, required=True)
    p = kinds.add_parser("rollout", parents=[common], help="rollout() vs pipe() on the tiny pipelines")
    p.add_argument("--families", nargs="+", default=None, help="tiny families (default: all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 = steadiest")
    p.add_argument("--json", help="also write the records to this JSON file")
    p.set_defaults(handler=cmd_bench_rollout)
    p = kinds.add_parser("backprop", parents=[common], help="reward backprop: time and memory vs K")
    p.add_argument("--family", default="sd15")
    p.add_argument("--ks", nargs="+", default=["1", "2", "4", "all"], help="truncation K values (or 'all')")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=cmd_bench_backprop)
    p = kinds.add_parser("grpo", parents=[common], help="GRPO seconds per epoch: full SDE vs window vs sliding")
    p.add_argument("--families", nargs="+", default=["sd3", "flux"], help="tiny pipeline families")
    p.add_argument("--plans", nargs="+", default=["sde", "window", "sliding"], choices=["sde", "window", "sliding"])
    p.add_argument("--steps", type=int, default=10, help="denoising steps per rollout")
    p.add_argument("--epochs", type=int, default=4, help="epochs per plan (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.set_defaults(handler=cmd_bench_grpo)
    p = kinds.add_parser(
        "branch", parents=[common], help="BranchGRPO vs Flow-GRPO seconds per iteration at the same final images"
    )
    p.add_argument("--models", nargs="+", default=["shapes", "sd3"], help="the shapes model and/or tiny families")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per rollout (BranchGRPO: 20)")
    p.add_argument("--splits", type=int, nargs="+", default=[0, 3, 6, 9], help="split steps (BranchGRPO: 0 3 6 9)")
    p.add_argument("--prompts-per-epoch", type=int, default=2, help="trees (prompts) per iteration")
    p.add_argument("--epochs", type=int, default=4, help="iterations per setting (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.set_defaults(handler=cmd_bench_branch)
    p = kinds.add_parser(
        "learn", parents=[common], help="learning benchmark on the shapes world: held-out accuracy before/after"
    )
    p.add_argument("--method", required=True, choices=LEARN_METHODS, help="the trainer to benchmark")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: the method's, ~10 min on 2 CPU cores)"
    )
    budget.add_argument("--minutes", type=float, default=None, help="a wall-clock budget instead (machine-dependent)")
    p.add_argument("--eval-every", type=int, default=0, help="dpo/backprop: held-out curve every N steps (0: off)")
    p.add_argument(
        "--early-stopping",
        type=int,
        default=0,
        metavar="PATIENCE",
        help="dpo/backprop: stop after PATIENCE evaluations without improvement, keep the best (needs --eval-every)",
    )
    p.add_argument("--output", default=None, help="output folder (default runs/bench_learn/<method>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(handler=cmd_bench_learn)
    p = kinds.add_parser(
        "sampling-alignment",
        parents=[common],
        help="shapes world: RL guidance of the demo LoRA at several w, best-of-N by the shapes CLIP (verifier-judged)",
    )
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0], help="RL guidance w")
    p.add_argument("--candidates", type=int, nargs="+", default=[1, 2, 4, 8], help="best-of-N values")
    p.add_argument("--search-reward", default="shapes_clip", help="the reward best-of-N chooses by")
    p.add_argument("--seeds", type=int, default=16, help="evaluation seeds per prompt (default: 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(handler=cmd_bench_sampling_alignment)
    p = kinds.add_parser(
        "reward-server", parents=[common], help="reward server throughput on CPU, and GRPO epochs remote vs local"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="images per request")
    p.add_argument("--requests", type=int, default=64, help="requests per batch size (default: 64)")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads (default: 4)")
    p.add_argument("--resolution", type=int, default=256, help="image side (default: 256)")
    p.add_argument("--epochs", type=int, default=4, help="tiny GRPO epochs per run, the first a warm-up (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.set_defaults(handler=cmd_bench_reward_server)


def _add_reward(sub, common) -> None:
    reward = sub.add_parser("reward", parents=[common], help="reward tools: serve a reward over HTTP")
    actions = reward.add_subparsers(dest="reward_command", metavar="ACTION", parser_class=_Parser, required=True)
    p = actions.add_parser(
        "serve",
        parents=[common],
        help="serve a reward over HTTP (clients: the reward spec remote:http://HOST:PORT)",
        description="Serve one reward over HTTP with dynamic batching (docs/rewards.md#reward-server). Trainers "
        "and rewards.load use it through the spec remote:http://HOST:PORT.",
    )
    p.add_argument("--reward", required=True, help="reward name, module:fn, file.py:fn, or a JSON {name: weight}")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--batch-size", type=int, default=8, help="most images per reward call (default: 8)")
    p.add_argument("--device", default=None, help="where the reward runs: cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="the reward model's dtype (default: the reward's)")
    p.add_argument(
        "--token", default=None, help="require 'Authorization: Bearer TOKEN' (default: $REWARD_SERVER_TOKEN)"
    )
    p.add_argument("--max-queue", type=int, default=256, help="most images waiting; beyond: HTTP 503 (default: 256)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request before HTTP 504 (default: 300)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for a batch to fill, in ms (default: 5)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image H*W; beyond: HTTP 400")
    p.add_argument("--max-request-mb", type=int, default=256, help="largest request body in MiB; beyond: HTTP 413")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="reward option, e.g. path=/models/x"
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=cmd_reward_serve)


def _add_export(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], help="a checkpoint as a LoRA or pipeline folder (joins shards)")
    p.add_argument("checkpoint", help="a checkpoint folder (<run>/checkpoints/checkpoint-N) or a run folder (newest)")
    p.add_argument("--out", required=True, help="folder to write: the LoRA, or the fine-tuned pipeline")
    p.set_defaults(handler=cmd_export)


def _add_plan(sub, common) -> None:
    p = sub.add_parser("plan", parents=[common], help="per-GPU memory of a training config (no weights loaded)")
    p.add_argument("config", help="YAML config with a 'method' key (as for train)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=2")
    p.add_argument("--gpus", type=int, default=1, help="processes, one GPU each (default: 1)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU: 80GB, 40GiB, 24000MB (default: 80GB)")
    p.add_argument(
        "--sharding", choices=("ddp", "fsdp2"), default="ddp", help="replicate (ddp, default) or shard the denoiser"
    )
    p.add_argument("--architecture", metavar="NAME", help="plan this shipped architecture (a fine-tune of it)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=cmd_plan)


def _add_demo(sub, common) -> None:
    # No -h of its own: everything after `demo` (but --debug) goes to the demo, which has its own --help.
    p = sub.add_parser("demo", parents=[common], add_help=False, help="align the shapes-world model (demo)")
    p.set_defaults(handler=cmd_demo, passthrough=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diffalign",
        description="Align text-to-image diffusion and flow-matching models with human preferences.",
    )
    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common()
    for add in (
        _add_train,
        _add_sample,
        _add_grid,
        _add_score,
        _add_pairs,
        _add_export,
        _add_bench,
        _add_reward,
        _add_plan,
        _add_demo,
    ):
        add(sub, common)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _device(name: str | None) -> str:
    if name is not None:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(args: argparse.Namespace) -> Any:
    import torch

    from diffalign.adapters import load_adapter

    kwargs = {"height": args.height, "width": args.width, "max_sequence_length": args.max_sequence_length}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    adapter = load_adapter(args.model, device=_device(args.device), dtype=dtype, **kwargs)
    adapter.compile_denoiser(getattr(args, "compile", "none"))  # sample and grid have --compile
    return adapter


def _guidance(args: argparse.Namespace, adapter: Any) -> float:
    return args.guidance if args.guidance is not None else adapter.default_guidance_scale


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _lazy(module: str, name: str, what: str) -> Callable[..., Any]:
    """``module.name``, or a clear error when that module (written by a later issue) does not exist yet."""
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            raise ImportError(f"{what} is not available yet: {module} does not exist in this install") from err
        raise
    if not hasattr(found, name):
        raise ImportError(f"{what} is not available yet: {module} has no {name}()")
    return getattr(found, name)


# ---------------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------------


def _read_method(path: str) -> str:
    """The ``method`` key of a YAML config."""
    import yaml

    from diffalign.trainers import TRAINERS

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", source=str(file)) from None
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"no 'method' key; add one of: {', '.join(TRAINERS)}", source=str(file))
    return str(data["method"])


def _trainer_classes(method: str) -> tuple[type, Any]:
    from diffalign.trainers import get_trainer

    try:
        return get_trainer(method)
    except ValueError as err:
        raise ConfigError(str(err), key="method") from None


def cmd_train(args: argparse.Namespace) -> int:
    from diffalign.config import describe_config, load_config

    if args.config is None and not (args.help_config and args.method):
        raise UsageError("train needs a CONFIG.yaml (or --help-config --method NAME)")
    method = args.method if args.config is None else _read_method(args.config)
    config_class, trainer_class = _trainer_classes(method)
    if args.help_config:
        print(f"# keys of the {method!r} config (dotted keys work as overrides: key=value)")
        print(describe_config(config_class))
        return 0
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume_from={json.dumps(args.resume)}")
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    if args.allow_config_change:
        overrides.append("checkpoint.allow_config_change=true")
    config = load_config(config_class, args.config, overrides)
    metrics = trainer_class(config).train()
    if _is_main_process():
        print(f"trained {method} for {config.max_steps} steps; run folder: {config.output_dir}")
        for key, value in sorted((metrics or {}).items()):
            if isinstance(value, (int, float)):
                print(f"  {key}: {value:.4g}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# sample / grid / score / pairs
# ---------------------------------------------------------------------------------------------------------------------


def _image_name(index: int, prompt: str, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in prompt.lower()).strip("-")[:40] or "image"
    return f"{index:03d}-{slug}-s{seed}.png"


def cmd_sample(args: argparse.Namespace) -> int:
    from diffalign.eval.grid import ode_images, resolve_lora, tile_images, to_pil

    _check_positive(steps=args.steps, num_images_per_prompt=args.num_images_per_prompt, batch_size=args.batch_size)
    if len(args.lora) > 1:
        raise UsageError("sample takes one --lora (use 'diffalign grid' to compare several)")
    if args.alignment_scale is not None and not args.lora:
        raise UsageError("--alignment-scale mixes the base model with a LoRA: give the --lora")
    search = _noise_search(args)
    if len(args.reward) > 1:
        raise UsageError("sample chooses by one --reward")
    adapter = _load_model(args)
    _load_negative_lora(args, adapter)
    if args.lora:
        adapter.load_lora(resolve_lora(args.lora[0]))
        adapter.alignment_scale = args.alignment_scale
    seeds = [args.seed + i for i in range(args.num_images_per_prompt)]
    guidance = _guidance(args, adapter)
    if search is None:
        images = ode_images(adapter, args.prompt, seeds, args.steps, guidance, args.batch_size)
    else:
        images = _searched_images(args, adapter, seeds, search, guidance)
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        out.mkdir(parents=True, exist_ok=True)
        cells = [(prompt, seed) for prompt in args.prompt for seed in seeds]
        for index, (image, (prompt, seed)) in enumerate(zip(images, cells)):
            to_pil(image).save(out / _image_name(index, prompt, seed))
        print(f"wrote {len(cells)} images to {out}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = to_pil(images[0]) if len(images) == 1 else tile_images(images, len(seeds))
    picture.save(out, format="PNG")
    print(f"wrote {out} ({picture.width}x{picture.height}, {len(images)} image(s))")
    return 0


def _load_negative_lora(args: argparse.Namespace, adapter: Any) -> None:
    """``--negative-lora``: load it into CFG's unconditional branch (it needs CFG to act)."""
    from diffalign.eval.grid import resolve_lora

    if args.negative_lora is None:
        return
    if _guidance(args, adapter) <= 1.0:
        raise UsageError("--negative-lora acts on CFG's unconditional branch: give --guidance above 1")
    adapter.load_negative_lora(resolve_lora(args.negative_lora))


def _searched_images(args: argparse.Namespace, adapter: Any, seeds: list[int], search: Any, guidance: float):
    """``diffalign sample --best-of N``: the chosen images; every candidate's reward goes to ``<out>.search.json``."""
    from diffalign.eval.score import build_rewards
    from diffalign.eval.search import search_initial_noise

    ((label, reward),) = build_rewards(args.reward, device=adapter.device).items()
    result = search_initial_noise(
        adapter,
        args.prompt,
        seeds,
        reward,
        search,
        num_steps=args.steps,
        guidance_scale=guidance,
        batch_size=args.batch_size,
    )
    cells = [
        {"prompt": p, "seed": seed, "candidates": c}
        for (p, seed), c in zip([(p, seed) for p in args.prompt for seed in seeds], result.candidates)
    ]
    report = Path(args.out.rstrip("/" + os.sep) + ".search.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    payload = {"reward": label, "search": dataclasses.asdict(search), "cells": cells}
    report.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    best = ", ".join(f"{value:.3f}" for value in result.best_rewards)
    print(f"best-of-{search.candidates} ({search.rounds} round(s)) by {label}: {best}; every candidate in {report}")
    return result.images


def _prompts(args: argparse.Namespace) -> list[str]:
    """The texts of ``--prompt``, or the prompts of ``--prompts`` (a file; text that does not look like a path is
    the one prompt), read before any model or reward is loaded."""
    from diffalign.data.prompts import load_prompts

    if args.prompt is not None:
        return load_prompts(args.prompt)
    return load_prompts(args.prompts, literal_hint="--prompt 'TEXT'")


def _prompt_records(args: argparse.Namespace) -> tuple[list[str], list[dict], list[Path] | None]:
    """The prompts of ``--prompt`` / ``--prompts`` with their metadata and, for an edit JSONL, their source images
    (paths relative to the file; docs/architecture.md#editing)."""
    from diffalign.data.edits import resolve_source_images
    from diffalign.data.prompts import load_prompt_records

    if args.prompt is not None:
        texts = _prompts(args)
        return texts, [{} for _ in texts], None
    records = load_prompt_records(args.prompts, literal_hint="--prompt 'TEXT'")
    metadata = [dict(record.metadata) for record in records]
    return [record.prompt for record in records], metadata, resolve_source_images(metadata, args.prompts, "--prompts")


def cmd_grid(args: argparse.Namespace) -> int:
    from diffalign.data.edits import SourceImages
    from diffalign.eval.grid import make_eval_grid
    from diffalign.eval.score import build_rewards

    _check_positive(steps=args.steps, batch_size=args.batch_size, cell_size=args.cell_size)
    if args.alignment_scale is not None and not args.lora:
        raise UsageError("--alignment-scale mixes the base model with a LoRA: give at least one --lora")
    search = _noise_search(args)
    prompts, metadata, source_paths = _prompt_records(args)
    device = _device(args.device)
    rewards = build_rewards(args.reward, device=device)
    adapter = _load_model(args)
    _load_negative_lora(args, adapter)
    sources = None
    if source_paths is not None:
        if not adapter.edits_images:
            raise UsageError(f"--prompts name source images ('image') but {adapter.family} does not edit")
        sources = SourceImages(source_paths, adapter.height, adapter.width).batch(range(len(prompts)))
    grid = make_eval_grid(
        adapter,
        prompts,
        args.seeds,
        loras=args.lora,
        rewards=rewards,
        include_base=not args.no_base,
        num_steps=args.steps,
        guidance_scale=_guidance(args, adapter),
        cell_size=args.cell_size,
        batch_size=args.batch_size,
        alignment_scales=args.alignment_scale,
        search=search,
        sources=sources,
        metadata=metadata,
    )
    grid.settings.update(model=args.model, rewards={label: spec for label, spec in zip(rewards, args.reward)})
    if args.negative_lora is not None:
        grid.settings["negative_lora"] = args.negative_lora
    png, scores = grid.save(args.out, args.json)
    print(f"wrote {png} ({grid.image.width}x{grid.image.height}) and {scores}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from diffalign.eval.score import build_rewards, score_images

    _check_positive(batch_size=args.batch_size)
    prompts = _prompts(args)  # one for all images, or one per image
    device = _device(args.device)
    rewards = build_rewards(args.reward, device=device)
    report = score_images(args.images, prompts, rewards, args.batch_size, device)
    print(report.table())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    make_pairs = _lazy("diffalign.data.ai_feedback", "make_preference_pairs", "diffalign pairs")
    from diffalign.rewarding import build_reward

    _check_positive(num_per_prompt=args.num_per_prompt, steps=args.steps, batch_size=args.batch_size)
    prompts = _prompts(args)
    adapter = _load_model(args)
    reward = build_reward(args.reward, device=adapter.device)
    path = make_pairs(
        adapter,
        prompts,
        reward,
        args.num_per_prompt,
        args.out,
        pairing=args.pairing,
        num_steps=args.steps,
        guidance_scale=_guidance(args, adapter),
        seed=args.seed,
        batch_size=args.batch_size,
    )
    print(f"wrote preference pairs to {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# bench / demo
# ---------------------------------------------------------------------------------------------------------------------


def cmd_bench_rollout(args: argparse.Namespace) -> int:
    from diffalign.bench import bench_rollout
    from diffalign.testing import FAMILIES

    families = tuple(args.families or FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise UsageError(f"unknown tiny families {unknown}; choose from {', '.join(FAMILIES)}")
    _check_positive(steps=args.steps, batch_size=args.batch_size, repeats=args.repeats, threads=args.threads)
    records = bench_rollout(families, args.steps, args.batch_size, args.repeats, args.resolution, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_bench_backprop(args: argparse.Namespace) -> int:
    try:
        bench = _lazy("diffalign.bench", "bench_reward_backprop", "diffalign bench backprop")
    except ImportError:
        bench = _lazy("diffalign.trainers.reward_backprop", "bench_reward_backprop", "diffalign bench backprop")
    ks = tuple(k if k == "all" else int(k) for k in args.ks)
    options = {"resolution": args.resolution, "num_steps": args.steps}
    bench(family=args.family, ks=ks, device=args.device, **{k: v for k, v in options.items() if v is not None})
    return 0


def cmd_bench_grpo(args: argparse.Namespace) -> int:
    bench = _lazy("diffalign.bench", "bench_grpo", "diffalign bench grpo")
    bench(families=args.families, plans=args.plans, num_steps=args.steps, epochs=args.epochs, threads=args.threads)
    return 0


def cmd_bench_branch(args: argparse.Namespace) -> int:
    _check_positive(steps=args.steps, epochs=args.epochs, prompts_per_epoch=args.prompts_per_epoch)
    bench = _lazy("diffalign.bench", "bench_branch", "diffalign bench branch")
    bench(
        models=args.models,
        num_steps=args.steps,
        splits=args.splits,
        prompts_per_epoch=args.prompts_per_epoch,
        epochs=args.epochs,
        threads=args.threads,
    )
    return 0


def cmd_bench_sampling_alignment(args: argparse.Namespace) -> int:
    _check_positive(seeds=args.seeds, **{f"candidates ({n})": n for n in args.candidates})
    bench = _lazy("diffalign.bench", "bench_sampling_alignment", "diffalign bench sampling-alignment")
    results = bench(args.scales, args.candidates, args.search_reward, args.seeds, args.threads)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_bench_learn(args: argparse.Namespace) -> int:
    if args.minutes is not None and args.minutes <= 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    if args.eval_every < 0:
        raise UsageError(f"--eval-every must be >= 0, got {args.eval_every}")
    from diffalign.bench import GRPO_VARIANTS

    if args.early_stopping and args.method in GRPO_VARIANTS:
        raise UsageError("--early-stopping applies to dpo and backprop; the GRPO benchmarks run their whole budget")
    if args.early_stopping < 0 or (args.early_stopping and not args.eval_every):
        raise UsageError("--early-stopping needs a patience >= 1 and --eval-every N")
    _check_positive(threads=args.threads, steps=args.steps)
    bench = _lazy("diffalign.bench", "bench_learn", "diffalign bench learn")
    budget = {"minutes": args.minutes, "steps": args.steps, "eval_every": args.eval_every}
    budget["early_stopping"] = args.early_stopping
    bench(method=args.method, output=args.output, seed=args.seed, threads=args.threads, **budget)
    return 0


def cmd_bench_reward_server(args: argparse.Namespace) -> int:
    from diffalign.bench import bench_reward_server

    _check_positive(requests=args.requests, clients=args.clients, resolution=args.resolution, threads=args.threads)
    _check_positive(epochs=args.epochs, batch_sizes=min(args.batch_sizes))
    bench_reward_server(
        batch_sizes=args.batch_sizes,
        requests=args.requests,
        clients=args.clients,
        resolution=args.resolution,
        epochs=args.epochs,
        threads=args.threads,
    )
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# reward serve
# ---------------------------------------------------------------------------------------------------------------------


def cmd_reward_serve(args: argparse.Namespace) -> int:
    _check_positive(port=args.port, batch_size=args.batch_size, max_queue=args.max_queue)
    _check_positive(max_pixels=args.max_pixels, max_request_mb=args.max_request_mb)
    if args.token is not None and not args.token.strip():
        raise UsageError("--token is empty; give a real token, or leave it out on loopback")
    if args.timeout <= 0 or args.max_wait_ms < 0:
        raise UsageError("--timeout must be > 0 and --max-wait-ms >= 0")
    import rewards
    from rewards.server import parse_option_values, serve

    try:
        options = parse_option_values(args.option)
    except ValueError as err:
        raise UsageError(f"--option: {err}") from None
    spec = args.reward
    if spec.lstrip().startswith("{"):  # a weighted sum given as JSON: {"pickscore": 1.0, "aesthetic": 0.5}
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise UsageError(f"--reward looks like JSON but is not valid JSON: {err}") from None
    if isinstance(spec, str) and spec.startswith("remote"):
        raise UsageError("--reward is the reward this server computes; a remote: spec would only relay to another")
    device = _device(args.device)
    reward = rewards.load(spec, device=device, dtype=args.dtype, **options)
    serve(
        reward,
        host=args.host,
        port=args.port,
        batch_size=args.batch_size,
        max_queue=args.max_queue,
        timeout=args.timeout,
        token=args.token,
        device=device,
        max_wait=args.max_wait_ms / 1000,
        max_pixels=args.max_pixels,
        max_request_bytes=args.max_request_mb * 1024 * 1024,
        log_level=args.log_level,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from diffalign.trainers.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from diffalign.config import load_config
    from diffalign.planning import PlanSettings, UnknownArchitectureError, parse_memory, plan_memory
    from diffalign.planning.report import format_plan, plan_to_dict

    _check_positive(gpus=args.gpus)
    try:
        memory = parse_memory(args.gpu_memory)
    except ValueError as err:
        raise UsageError(f"--gpu-memory: {err}") from None
    config_class, _ = _trainer_classes(_read_method(args.config))
    config = load_config(config_class, args.config, list(args.overrides))
    settings = PlanSettings(args.gpus, memory, args.sharding, args.architecture)
    try:
        plan = plan_memory(config, settings)
    except UnknownArchitectureError as err:
        raise ConfigError(str(err), key="model.path", source=args.config) from None
    print(json.dumps(plan_to_dict(plan, args.config), indent=2) if args.json else format_plan(plan, args.config))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    demo = _lazy("diffalign.shapes.demo", "main", "diffalign demo")
    result = demo(list(args.extra))
    return int(result or 0)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """The error as one line; a config error lists all its problems, separated by semicolons."""
    if isinstance(err, ConfigError):
        where = f"invalid config {err.source}: " if err.source else "invalid config: "
        return where + "; ".join(str(issue) for issue in err.issues)
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def _exit_code(err: BaseException) -> int:
    return EXIT_USAGE if isinstance(err, (UsageError, ConfigError)) else EXIT_RUNTIME


def _describe(err: BaseException) -> str:
    known = _known_errors()
    message = _one_line(err)
    if isinstance(err, known) or isinstance(err, (UsageError, ConfigError)):
        return message
    return f"{type(err).__name__}: {message} (run with --debug for the traceback)"


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is meant for the user (bad input, missing files); others also show their type."""
    errors: list[type[BaseException]] = [FileNotFoundError, ValueError, ImportError, OSError]
    for module, names in (
        ("diffalign.adapters", ("UnsupportedPipelineError",)),
        ("rewards", ("UnknownRewardError", "RewardInputError")),
        ("diffalign.trainers.common", ("TrainingDivergedError",)),
    ):
        loaded = sys.modules.get(module)  # only modules already imported: an error path imports nothing heavy
        errors.extend(getattr(loaded, name) for name in names if loaded is not None and hasattr(loaded, name))
    return tuple(errors)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.extra = extra
    elif extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see 'diffalign --help')")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 runtime error, 2 usage or config error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    try:
        args = _parse(parser, argv)
        debug = args.debug
        if args.command is None:
            parser.print_help()
            return 0
        return args.handler(args)
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print("diffalign: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(f"diffalign: error: {_describe(err)}", file=sys.stderr)
        return _exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
