"""The one surface every result object has, and the helpers it is built from.

Every object a public function of this package returns as a result (a head scan, an evaluation, an
attribution, a fast-weight run, an analysis, ...) subclasses :class:`Result` and so has:

* ``to_dict()`` -- plain JSON data (what the command writes, less the ``provenance`` block);
* ``to_dataframe()`` -- the main table (pandas DataFrame);
* ``figures()`` -- the panels, each a plotly ``Figure`` (what the HTML report lays out one by one);
* ``plot()`` -- one plotly ``Figure``: the single panel, or all panels stacked as subplots
  (:func:`combine_figures`);
* ``findings()`` -- ``{name: number | str | None, ..., "reading": sentence}`` where the result has a
  reading, else ``None``;
* ``_repr_html_()`` -- the notebook view: the reading (if any) and the first rows of the table.

A subclass overrides ``figures()`` (several panels) or ``plot()`` (one panel); the other follows.
``tests/test_results.py`` collects every such class in the package and checks this surface on an
instance of each.
"""

from __future__ import annotations

import html
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from icl_circuits.report import table_html

#: Colours of the series a report compares (tasks, conditions): the i-th task gets ``PALETTE[i % 10]``
#: in every panel of a report, and every trace sets its colour so the legend entry matches it.
PALETTE: tuple[str, ...] = (
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6", "#bab0ac",
)  # fmt: skip


def series_colors(names: Sequence[str]) -> dict[str, str]:
    """``{name: colour}`` from :data:`PALETTE`, in the order given (the same name -> the same colour)."""
    out: dict[str, str] = {}
    for name in names:
        if name not in out:
            out[name] = PALETTE[len(out) % len(PALETTE)]
    return out


class Result(ABC):
    """Base of every result object (see the module doc). Subclasses are (frozen) dataclasses."""

    #: A short human title, used by ``_repr_html_`` and as the combined figure's title.
    title: ClassVar[str] = ""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Everything measured as JSON-ready plain data (no NaN: missing values are ``None``)."""

    @abstractmethod
    def to_dataframe(self) -> Any:
        """The main table (pandas DataFrame, long format)."""

    def figures(self) -> list[Any]:
        """The panels (plotly Figures); pure: no show, no files. Default: ``[self.plot()]``."""
        if type(self).plot is Result.plot:
            raise NotImplementedError(f"{type(self).__name__} must override figures() or plot()")
        return [self.plot()]

    def plot(self) -> Any:
        """One plotly ``Figure``: the only panel, or every panel of :meth:`figures` stacked (subplots)."""
        if type(self).figures is Result.figures:
            raise NotImplementedError(f"{type(self).__name__} must override figures() or plot()")
        return combine_figures(self.figures(), title=self.title or None)

    def findings(self) -> dict[str, Any] | None:
        """The headline numbers and ``"reading"`` (one computed sentence), or ``None`` without a reading."""
        return None

    def _repr_html_(self) -> str:
        found = self.findings()
        reading = f"<p>{html.escape(str(found['reading']))}</p>" if found and found.get("reading") else ""
        title = f"<h4>{html.escape(self.title)}</h4>" if self.title else ""
        return f"<div>{title}{reading}{table_html(self.to_dataframe(), max_rows=20)}</div>"


# ------------------------------------------------------------------------------ one argument name per concept

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**old_to_new: str) -> Callable[[F], F]:
    """Accept the old keyword names ``old=new`` for one release, with a ``DeprecationWarning``.

    Passing both the old and the new name is an error (:class:`~icl_circuits.errors.InputError`).
    """
    import functools

    from icl_circuits.errors import InputError

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise InputError(f"{fn.__name__}: pass {new}= only ({old}= is its old name)")
                    warnings.warn(f"{fn.__name__}({old}=...) is renamed {new}=; the old name goes in the next "
                                  "release", DeprecationWarning, stacklevel=2)  # fmt: skip
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


# ------------------------------------------------------------------------------ several panels -> one figure


def _axis_key(ref: str, letter: str) -> str:
    """``"x2"`` -> ``"xaxis2"``; ``"x"`` -> ``"xaxis"``."""
    return f"{letter}axis{ref[1:]}"


def combine_figures(figs: Sequence[Any], title: str | None = None) -> Any:
    """Stack plotly figures into one: every subplot of every figure becomes one row (one x/y axis pair).

    Traces keep their data, names and colours; axis titles, categories, ranges and reversals, shapes
    and annotations tied to an axis (``add_hline``), coloraxes and colorbars move with their row. Each
    row is titled with its figure's title (and the subplot's title where the figure had several).
    One figure is returned as it is.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figs = list(figs)
    if not figs:
        return go.Figure()
    if len(figs) == 1:
        return figs[0]
    panels: list[tuple[int, str, str]] = []  # (figure index, x ref, y ref)
    titles: list[str] = []
    for i, f in enumerate(figs):
        pairs = list(dict.fromkeys((t.xaxis or "x", t.yaxis or "y") for t in f.data)) or [("x", "y")]
        sub = [a.text for a in f.layout.annotations if a.xref == "paper" and a.yref == "paper"]
        head = f.layout.title.text or ""
        for k, (x, y) in enumerate(pairs):
            panels.append((i, x, y))
            extra = sub[k] if len(pairs) > 1 and len(sub) == len(pairs) else ""
            titles.append(f"{head}: {extra}" if head and extra else head or extra)
    n = len(panels)
    out = make_subplots(rows=n, cols=1, subplot_titles=titles, vertical_spacing=min(0.3 / n, 0.08))
    n_coloraxes = 0
    for row, (i, x, y) in enumerate(panels, start=1):
        f = figs[i]
        xa, ya = out.get_subplot(row, 1).xaxis, out.get_subplot(row, 1).yaxis
        new_x, new_y = xa.plotly_name.replace("axis", ""), ya.plotly_name.replace("axis", "")
        lo, hi = ya.domain
        renamed: dict[str, str] = {}
        for t in f.data:
            if (t.xaxis or "x", t.yaxis or "y") != (x, y):
                continue
            t = go.Figure(t).data[0]  # a copy: the caller's figure is not changed
            ca = getattr(t, "coloraxis", None)
            if ca:
                if ca not in renamed:
                    n_coloraxes += 1
                    renamed[ca] = "coloraxis" if n_coloraxes == 1 else f"coloraxis{n_coloraxes}"
                    spec = f.layout[ca].to_plotly_json()
                    spec.setdefault("colorbar", {}).update({"y": (lo + hi) / 2, "len": hi - lo})
                    out.layout[renamed[ca]] = spec
                t.coloraxis = renamed[ca]
            elif "colorbar" in t and getattr(t, "showscale", None) is not False:
                t.colorbar.update(y=(lo + hi) / 2, len=hi - lo)
            out.add_trace(t, row=row, col=1)
        for src, dst, letter in ((x, xa, "x"), (y, ya, "y")):
            spec = f.layout[_axis_key(src, letter)].to_plotly_json()
            for key in ("domain", "anchor", "matches", "overlaying", "scaleanchor"):
                spec.pop(key, None)
            dst.update(spec)
        for shape in f.layout.shapes:
            if shape.xref in (x, f"{x} domain") or shape.yref in (y, f"{y} domain"):
                s = shape.to_plotly_json()
                s["xref"] = str(shape.xref).replace(x, new_x, 1) if shape.xref != "paper" else "paper"
                s["yref"] = str(shape.yref).replace(y, new_y, 1) if shape.yref != "paper" else "paper"
                out.add_shape(s)
        for ann in f.layout.annotations:
            if ann.xref in (x, f"{x} domain") or ann.yref in (y, f"{y} domain"):
                a = ann.to_plotly_json()
                a["xref"] = str(ann.xref).replace(x, new_x, 1) if ann.xref != "paper" else "paper"
                a["yref"] = str(ann.yref).replace(y, new_y, 1) if ann.yref != "paper" else "paper"
                out.add_annotation(a)
    barmodes = {f.layout.barmode for f in figs if f.layout.barmode}
    out.update_layout(title=title, height=320 * n, barmode=barmodes.pop() if len(barmodes) == 1 else None)
    return out
