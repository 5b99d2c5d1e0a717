"""The spawn form (GPU count and model, limits in force) and validation of its options.

``validate_options`` is the gate for both the form and the REST API, whose options
never pass through the form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from html import escape
from typing import Any

from .errors import LabVMError
from .policy import GpuPolicy, Limits

OPTION_KEYS = ("gpus", "gpu_model")


def format_bytes(n: int) -> str:
    """Binary units, one decimal at most: 8589934592 -> "8 GiB", 1610612736 -> "1.5 GiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"


def _number(x: float) -> str:
    return f"{x:g}"


def allowed_models(policy: GpuPolicy, models_available: list[str]) -> list[str]:
    """Models on this node the policy lets the user have, in node order."""
    present = list(dict.fromkeys(models_available))
    if policy.models is None:
        return present
    return [m for m in present if m in policy.models]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render_form(
    limits: Limits,
    policy: GpuPolicy,
    free_by_model: Mapping[str, int],
    total_by_model: Mapping[str, int],
    caps: list[str] | None = None,
) -> str:
    """HTML fragment for JupyterHub's options_form.

    ``free_by_model`` should count GPUs the user already holds as free to them, so a
    restart can ask for the same GPUs again. ``limits`` are those that will really
    apply; ``caps`` say which the node's capacity lowered from the policy.
    """
    allowed = allowed_models(policy, list(total_by_model))
    free_of = {m: max(0, int(free_by_model.get(m, 0))) for m in allowed}
    # "Any model" (policy allows any) may combine models; a chosen model cannot.
    any_model = policy.models is None
    free = sum(free_of.values()) if any_model else max(free_of.values(), default=0)
    top = max(0, min(policy.max_gpus, free))

    if policy.max_gpus == 0:
        note = "Your account is not granted GPUs."
    elif not total_by_model:
        note = "This node has no GPUs."
    elif not allowed:
        note = "No GPU model your account may use is installed on this node."
    elif free == 0:
        note = "All GPUs you may use are taken right now; you can start without one."
    else:
        total = sum(int(total_by_model.get(m, 0)) for m in allowed)
        note = (
            f"{sum(free_of.values())} of {_plural(total, 'GPU')} free; "
            f"you may use up to {policy.max_gpus}."
        )

    parts = ['<div class="labvm-options">', '<div class="form-group">']
    parts.append('<label for="labvm-gpus">GPUs</label>')
    parts.append('<select class="form-control" id="labvm-gpus" name="gpus">')
    for n in range(top + 1):
        selected = " selected" if n == 0 else ""
        parts.append(f'<option value="{n}"{selected}>{n}</option>')
    parts.append("</select>")
    parts.append(f'<p class="help-block">{escape(note)}</p>')
    parts.append("</div>")

    if len(allowed) > 1 and top > 0:
        parts.append('<div class="form-group">')
        parts.append('<label for="labvm-gpu-model">GPU model</label>')
        parts.append('<select class="form-control" id="labvm-gpu-model" name="gpu_model">')
        if any_model:
            parts.append('<option value="" selected>Any model</option>')
        for m in allowed:
            label = f"{m} ({free_of[m]} of {int(total_by_model.get(m, 0))} free)"
            parts.append(f'<option value="{escape(m)}">{escape(label)}</option>')
        parts.append("</select>")
        parts.append("</div>")
    elif len(allowed) == 1 and top > 0:
        parts.append(f'<p class="labvm-gpu-model">GPU model: {escape(allowed[0])}</p>')

    rows = [
        ("CPUs", _number(limits.cpus)),
        ("Memory", format_bytes(limits.mem_bytes)),
        ("Processes", str(limits.pids)),
        ("Disk IO weight", "default" if limits.blkio_weight is None else str(limits.blkio_weight)),
        ("Disk read", _rate(limits.io_read_bps)),
        ("Disk write", _rate(limits.io_write_bps)),
        ("Disk space", "unlimited" if limits.disk_bytes is None
         else format_bytes(limits.disk_bytes)),
        ("Stored layer", "unlimited" if limits.store_bytes is None
         else format_bytes(limits.store_bytes)),
    ]
    parts.append('<table class="table table-condensed labvm-limits">')
    parts.append("<caption>Limits for your server</caption>")
    for name, value in rows:
        parts.append(f'<tr><th scope="row">{escape(name)}</th><td>{escape(value)}</td></tr>')
    parts.append("</table>")
    for cap in caps or []:
        parts.append(f'<p class="help-block labvm-cap">{escape(cap)}</p>')
    parts.append("</div>")
    return "\n".join(parts)


def _rate(bps: int | None) -> str:
    return "unlimited" if bps is None else f"{format_bytes(bps)}/s"


def parse_form(formdata: Mapping[str, list[str]]) -> dict[str, Any]:
    """Form fields -> options. Other fields (e.g. JupyterHub's _xsrf) are ignored."""

    def first(key: str) -> str:
        values = formdata.get(key) or [""]
        return values[0].strip()

    raw = first("gpus")
    try:
        gpus = int(raw) if raw else 0
    except ValueError:
        raise LabVMError(f"GPU count must be a whole number, got {raw!r}") from None
    return {"gpus": gpus, "gpu_model": first("gpu_model") or None}


def validate_options(
    options: Mapping[str, Any], policy: GpuPolicy, models_available: list[str]
) -> tuple[int, str | None]:
    """(GPU count, model or None for any) if ``options`` are allowed; else LabVMError."""
    unknown = sorted(str(k) for k in options if k not in OPTION_KEYS)
    if unknown:
        raise LabVMError(
            f"Unknown server option(s): {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(OPTION_KEYS)}"
        )

    raw = options.get("gpus", 0)
    if raw is None:
        raw = 0
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise LabVMError(f"GPU count must be a whole number, got {raw!r}")
    gpus = raw
    if gpus < 0:
        raise LabVMError(f"GPU count must not be negative, got {gpus}")
    if gpus > policy.max_gpus:
        if policy.max_gpus == 0:
            raise LabVMError(f"Your account is not granted GPUs; {gpus} requested")
        raise LabVMError(f"You may use at most {_plural(policy.max_gpus, 'GPU')}; {gpus} requested")

    model = options.get("gpu_model")
    if model == "":
        model = None
    if model is not None and not isinstance(model, str):
        raise LabVMError(f"GPU model must be a model name, got {model!r}")
    allowed = allowed_models(policy, models_available)
    if model is not None and model not in allowed:
        if model in models_available:
            raise LabVMError(
                f"Your account may not use GPU model {model!r}; allowed here: "
                f"{', '.join(map(repr, allowed)) or 'none'}"
            )
        raise LabVMError(
            f"Unknown GPU model {model!r}; this node has: "
            f"{', '.join(map(repr, dict.fromkeys(models_available))) or 'no GPUs'}"
        )
    if gpus == 0:
        return 0, None

    if not allowed:
        if not models_available:
            raise LabVMError("This node has no GPUs; start without one")
        raise LabVMError("No GPU model your account may use is installed on this node")
    if model is None and policy.models is not None:
        if len(allowed) > 1:
            raise LabVMError(f"Choose a GPU model: one of {', '.join(map(repr, allowed))}")
        model = allowed[0]
    return gpus, model
