"""Recipe strings parsed into `Recipe` objects (`ladle.averaging.recipes`).

Recipe strings (the same in Python and on the command line; `str()` gives
the canonical form back):

    uniform                          every training checkpoint (in the window)
    last:K                           the K newest (the Transformer paper averaged the last 5, or 20)
    top:K:METRIC:min|max             the K best by a recorded metric (`top:K` uses the run's monitor)
    improved:SPEC[:over=best|previous][:warmup=F]
                                     the checkpoints that improved at least one metric of SPEC
    greedy:METRIC:min|max[:accept=no-worse|better|halves]
                                     Wortsman et al. 2022, needs an evaluate function
    window:epoch:13-50               alias of uniform@epoch:13-50

SPEC lists metrics with directions: `loss:min,auc:max`, or a group sharing the
direction written after it: `lrap,cmap,f1,auc:max` (each metric without one
takes the next direction to its right).

A window, by step or epoch and inclusive at both ends, narrows any recipe:
append `@epoch:13-50` or `@step:1000-` to the string, or pass it separately
(`window=`, `--window`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ladle.averaging.recipes import (
    WARMUP,
    Accept,
    Greedy,
    Improved,
    Last,
    Over,
    Recipe,
    Top,
    Uniform,
    Window,
    WindowBy,
)
from ladle.errors import ConfigError
from ladle.metrics import Mode, parse_mode

_WINDOW_RE = re.compile(r"^(step|epoch)s?[:=](\d*)(?:(-|\.\.)(\d*))?$")


def parse_window(text: str | Window | None) -> Window | None:
    """`epoch:13-50`, `step:1000-`, `epoch:-50`, `epoch:7` (None stays None)."""
    if text is None or isinstance(text, Window):
        return text
    match = _WINDOW_RE.match(text.strip())
    if not match or (not match.group(2) and not match.group(4)):
        raise ConfigError(f"window {text!r} not understood; write epoch:13-50, step:1000- or epoch:-50")
    by, lo, sep, hi = match.groups()
    start = int(lo) if lo else None
    end = int(hi) if hi else (start if sep is None else None)
    return Window(by=WindowBy(by), start=start, end=end)


def _int(text: str, field: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"{field}: {text!r} is not a whole number")
    return int(text)


def parse_improved(spec: str) -> Improved:
    """`loss:min,auc:max`, `lrap,cmap:max`, with optional `:over=best|previous` and `:warmup=F`."""
    options, spec = _options(spec, ("over", "warmup"), "improved")
    over = Over.BEST
    if "over" in options:
        try:
            over = Over(options["over"])
        except ValueError:
            raise ConfigError(
                f"improved: over={options['over']!r} is not known; use best or previous"
            ) from None
    warmup = WARMUP
    if "warmup" in options:
        try:
            warmup = float(options["warmup"])
        except ValueError:
            raise ConfigError(
                f"improved: warmup={options['warmup']!r} is not a number; write e.g. warmup=0.25"
            ) from None
    pairs: list[tuple[str, Mode]] = []
    pending: list[str] = []
    for item in spec.split(","):
        name, _, direction = item.strip().partition(":")
        if not name:
            raise ConfigError(f"improved:{spec}: an empty metric name")
        pending.append(name)
        if direction:
            mode = parse_mode(direction, field=f"improved {name}")
            pairs.extend((p, mode) for p in pending)
            pending = []
    if pending:
        raise ConfigError(
            f"improved:{spec}: no direction for {', '.join(pending)}; end with :min or :max "
            "(e.g. improved:lrap,cmap:max or improved:loss:min,auc:max)"
        )
    return Improved(metrics=tuple(pairs), over=over, warmup=warmup)


def _options(text: str, known: Sequence[str], head: str) -> tuple[dict[str, str], str]:
    """Trailing `:key=value` options of a recipe body, and the body without them."""
    options: dict[str, str] = {}
    while True:
        match = re.search(r":([A-Za-z_]+)=([^:]*)$", text)
        if not match:
            return options, text
        key, value = match.groups()
        if key not in known:
            raise ConfigError(f"{head}: option {key}= is not known; use {', '.join(f'{k}=' for k in known)}")
        if key in options:
            raise ConfigError(f"{head}: option {key}= given twice")
        options[key] = value
        text = text[: match.start()]


def parse_recipe(text: str | Recipe, window: str | Window | None = None) -> Recipe:
    """A `Recipe` from its string (see the module docstring), with an optional extra window."""
    extra = parse_window(window)
    if isinstance(text, Recipe):
        recipe = text
    else:
        recipe = _parse(text.strip())
    if extra is not None:
        if recipe.window is not None and recipe.window != extra:
            raise ConfigError(
                f"recipe {recipe} has window {recipe.window}; do not give a second one ({extra})"
            )
        recipe = Recipe(select=recipe.select, window=extra)
    return recipe


def _parse(text: str) -> Recipe:
    body, at, window_text = text.partition("@")
    window = parse_window(window_text) if at else None
    head, _, rest = body.partition(":")
    parts = rest.split(":") if rest else []
    usage = {
        "last": "last:K",
        "top": "top:K:METRIC:min|max",
        "greedy": "greedy:METRIC:min|max[:accept=no-worse|better|halves]",
        "improved": "improved:M1,M2,...:min|max",
    }
    try:
        if head == "uniform" and not parts:
            return Recipe(select=Uniform(), window=window)
        if head == "window" and rest:
            if window is not None:
                raise ConfigError(f"recipe {text!r}: two windows")
            return Recipe(select=Uniform(), window=parse_window(rest))
        if head == "last" and len(parts) == 1:
            return Recipe(select=Last(k=_int(parts[0], "last:K")), window=window)
        if head == "top" and len(parts) == 1:
            return Recipe(select=Top(k=_int(parts[0], "top:K")), window=window)
        if head == "top" and len(parts) == 3:
            k = _int(parts[0], "top:K")
            return Recipe(
                select=Top(k=k, metric=parts[1], mode=parse_mode(parts[2], field="top mode")), window=window
            )
        if head == "greedy":
            options, plain = _options(rest, ("accept",), "greedy")
            names = plain.split(":")
            if len(names) == 2:
                greedy = Greedy(
                    metric=names[0],
                    mode=parse_mode(names[1], field="greedy mode"),
                    accept=options.get("accept", Accept.NO_WORSE),  # type: ignore[arg-type]
                )
                return Recipe(select=greedy, window=window)
        if head == "improved" and rest:
            return Recipe(select=parse_improved(rest), window=window)
    except ConfigError as exc:
        raise ConfigError(f"recipe {text!r}: {exc}") from None
    if head in usage:
        raise ConfigError(f"recipe {text!r}: write {usage[head]}")
    raise ConfigError(
        f"recipe {text!r} not understood; use uniform, last:K, top:K:METRIC:min|max, "
        "improved:M1,M2:min|max, greedy:METRIC:min|max or window:epoch:A-B"
    )
