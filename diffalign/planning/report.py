"""Plans as text and JSON, and memory sizes as people write them (``80GB``, ``40GiB``)."""

from __future__ import annotations

import re
from typing import Any

from diffalign.planning.plan import GB, Item, MemoryPlan


__all__ = ["format_plan", "parse_memory", "plan_to_dict"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_memory(text: str) -> int:
    """Bytes of a memory size: a number with an optional unit, decimal (``KB``, ``MB``, ``GB``, ``TB``; ``G`` is
    ``GB``) or binary (``KiB``, ``MiB``, ``GiB``, ``TiB``); a bare number is bytes.

    Raises:
        ValueError: anything else, or a size that is not positive; the message shows how to write one.
    """
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).upper() if match else ""
    unit = unit + "B" if unit in ("K", "M", "G", "T") else unit
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 80GB, 40GiB or 24000MB")
    return int(float(match.group(1)) * _UNITS[unit])


def _gb(nbytes: int) -> float:
    return round(nbytes / GB, 2)


def _item(item: Item) -> dict[str, Any]:
    return {"name": item.name, "gb": _gb(item.bytes), "detail": item.detail}


def plan_to_dict(plan: MemoryPlan, config_path: str | None = None) -> dict[str, Any]:
    """The plan as JSON-ready data, sizes in decimal GB."""
    settings = plan.settings
    return {
        "config": config_path,
        "method": plan.method,
        "model": plan.model,
        "gpus": settings.gpus,
        "sharding": settings.sharding,
        "gpu_memory_gb": _gb(settings.gpu_memory),
        "resident": [_item(item) for item in plan.resident],
        "resident_gb": _gb(plan.resident_bytes),
        "phases": [
            {"name": phase.name, "gb": _gb(phase.bytes), "items": [_item(item) for item in phase.items]}
            for phase in plan.phases
        ],
        "activations_gb": {key: _gb(value) for key, value in plan.activations.items()},
        "peak_phase": plan.peak_phase.name,
        "total_gb": _gb(plan.total),
        "fits": plan.fits,
        "suggestions": list(plan.suggestions),
        "notes": list(plan.notes),
    }


def _row(name: str, nbytes: int, detail: str = "", indent: int = 2) -> str:
    return f"{' ' * indent}{name:<{34 - indent}}{nbytes / GB:>8.2f}   {detail}".rstrip()


def format_plan(plan: MemoryPlan, config_path: str | None = None) -> str:
    """The plan as a table: resident items, then each phase with what it adds, the peak against the memory."""
    settings, peak = plan.settings, plan.peak_phase
    title = f"{config_path} ({plan.method})" if config_path else plan.method
    lines = [
        f"memory plan of {title} on {plan.model}",
        f"{settings.gpus} GPU(s) of {settings.gpu_memory / GB:.1f} GB, {settings.sharding}",
        "",
        f"{'per GPU':<34}{'GB':>8}",
        "resident",
        *(_row(item.name, item.bytes, item.detail) for item in plan.resident),
        _row("total resident", plan.resident_bytes),
        "phases (each on top of the resident memory)",
    ]
    for phase in plan.phases:
        lines.append(_row(phase.name + ("  <- peak" if phase is peak else ""), phase.bytes))
        lines += [_row(item.name, item.bytes, item.detail, indent=4) for item in phase.items]
    if plan.activations:
        on, off = plan.activations["checkpointing on"], plan.activations["checkpointing off"]
        lines.append(f"training activations: {on / GB:.2f} GB with gradient checkpointing, {off / GB:.2f} GB without")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"peak ({peak.name}): {plan.total / GB:.2f} GB of {settings.gpu_memory / GB:.2f} GB: {verdict}")
    if plan.suggestions:
        lines.append("would fit with:")
        lines += [f"  - {suggestion}" for suggestion in plan.suggestions]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
