"""Plotly figure builders for the pages: tables in, figures out (no tensor math)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

SCORE_LABELS = {"singleton": "singleton fidelity", "saliency_share": "saliency share"}


def channel_heatmap(table: pd.DataFrame, score: str) -> go.Figure:
    """Layers × channels, each row sorted by keep priority (kept channels on the left)."""
    layers = list(dict.fromkeys(table["layer"]))
    width = int(table.groupby("layer").size().max())
    z = np.full((len(layers), width), np.nan)
    text = np.full((len(layers), width), "", dtype=object)
    for row, layer in enumerate(layers):
        rows = table[table["layer"] == layer].sort_values(["priority", score], ascending=[True, False])
        z[row, :len(rows)] = rows[score]
        text[row, :len(rows)] = [f"channel {c}<br>{'kept' if k else 'removed'}"
                                 for c, k in zip(rows["channel"], rows["kept"])]
    figure = go.Figure(go.Heatmap(
        z=z, y=layers, customdata=text, colorscale="Viridis", colorbar={"title": SCORE_LABELS[score]},
        hovertemplate="layer %{y}<br>%{customdata}<br>score %{z:.3f}<extra></extra>"))
    figure.update_layout(xaxis_title="input channels, by keep priority →", yaxis_title="layer",
                         height=120 + 28 * len(layers), margin={"t": 20})
    figure.update_yaxes(type="category", autorange="reversed")  # forward order, top to bottom
    return figure


def layer_heatmap(matrix: np.ndarray, score: str, layer: str) -> go.Figure:
    """Output × input scores of one layer."""
    figure = px.imshow(matrix, color_continuous_scale="Viridis", aspect="auto",
                       labels={"x": "input channel i", "y": "output channel c", "color": SCORE_LABELS[score]})
    figure.update_layout(title=f"{layer}: {SCORE_LABELS[score]} of every (output, input) pair",
                         margin={"t": 40})
    return figure


def fidelity_curve(curve: pd.DataFrame, *, level: float = 0.8) -> go.Figure:
    """FS(top-k) against k, with the smallest HiFi set reaching `level` marked."""
    figure = px.line(curve, x="k", y="fidelity", markers=True, hover_data=["added_channel"],
                     labels={"k": "HiFi set size k", "fidelity": "subset fidelity FS(top-k)"})
    reached = curve[curve["fidelity"] >= level]
    if len(reached):
        k = int(reached["k"].iloc[0])
        figure.add_vline(x=k, line_dash="dash", annotation_text=f"HiFi set: k = {k}")
    figure.add_hline(y=level, line_dash="dot", line_color="grey")
    figure.update_yaxes(range=[0, 1.02])
    return figure


def kept_bars(plan_frame: pd.DataFrame, unit: str) -> go.Figure:
    """Kept and removed `unit` (FFN neurons, heads) of every layer of a text plan (columns:
    layer, components, kept, removed)."""
    long = plan_frame.drop(columns="components").melt(id_vars="layer", var_name="fate",
                                                      value_name=unit)
    figure = px.bar(long, x="layer", y=unit, color="fate", barmode="stack",
                    color_discrete_map={"kept": "#2a9d8f", "removed": "#e76f51"})
    figure.update_xaxes(type="category", title="transformer layer")
    figure.update_layout(margin={"t": 20})
    return figure


def sparsity_curve(curve: pd.DataFrame, *, here: tuple[float, float] | None = None,
                   pinned: list[tuple[str, float, float]] = ()) -> go.Figure:
    """Accuracy against MACs reduction for ModHiFi and the baselines; `here`: (MACs reduction,
    accuracy) of the current plan, drawn as a star; `pinned`: (label, MACs reduction,
    accuracy) of runs the visitor picked, drawn as labelled diamonds."""
    figure = px.line(curve, x="macs_reduction", y="accuracy", color="method", markers=True,
                     labels={"macs_reduction": "MACs reduction (×)", "accuracy": "test accuracy"})
    if here is not None:
        figure.add_scatter(x=[here[0]], y=[here[1]], mode="markers", name="you are here",
                           marker={"symbol": "star", "size": 16, "color": "black"})
    if pinned:
        labels, x, y = zip(*pinned)
        figure.add_scatter(x=x, y=y, text=labels, mode="markers+text", name="picked runs",
                           textposition="top center",
                           marker={"symbol": "diamond", "size": 12, "color": "#e76f51"})
    figure.update_layout(margin={"t": 20})
    return figure


def class_bars(frame: pd.DataFrame, *, x: str = "class", highlight: str | None = None) -> go.Figure:
    """Per-class accuracy (columns: `x`, accuracy, and `when` to compare before and after), with
    the class `highlight` (e.g. the forgotten one) shaded."""
    figure = px.bar(frame, x=x, y="accuracy", color="when" if "when" in frame else None,
                    barmode="group")
    # Class names such as "0".."9" are names, not numbers: one tick and bar slot per class.
    figure.update_xaxes(type="category", title=x)
    figure.update_layout(margin={"t": 20}, yaxis_range=[0, 1], yaxis_tickformat=".0%")
    if highlight is not None:
        where = list(dict.fromkeys(frame[x])).index(highlight)
        figure.add_vrect(x0=where - 0.5, x1=where + 0.5, fillcolor="#e76f51", opacity=0.15,
                         line_width=0, annotation_text="forgotten", annotation_position="top")
    return figure


def confusion(matrix: list[list[int]], classes: list[str]) -> go.Figure:
    figure = px.imshow(np.array(matrix), x=classes, y=classes, text_auto=True,
                       color_continuous_scale="Blues",
                       labels={"x": "predicted", "y": "true", "color": "images"})
    figure.update_xaxes(type="category")  # class names such as "0".."9": every one a tick
    figure.update_yaxes(type="category")
    figure.update_layout(margin={"t": 20})
    return figure


def local_global(table: pd.DataFrame, fitted: float, bound: float | None = None, *,
                 bound_name: str = "bound") -> go.Figure:
    """Measured global error against the local error of each mask, with the fitted ratio and
    the theorem's bound C_l² × local (`bound` = C_l²; None: no line). Log axes: a mask that
    removes only dead inputs (both errors 0) has no place on them and is left off."""
    table = table[(table["local_error"] > 0) & (table["global_error"] > 0)]
    figure = px.scatter(table, x="local_error", y="global_error", color="kind", symbol="kind",
                        hover_data=["kept_share", "ratio"], log_x=True, log_y=True,
                        labels={"local_error": "local error Σ_c (1−m)ᵀQ_c(1−m)",
                                "global_error": "global error E‖f(x) − f_m(x)‖²"})
    if table.empty:
        return figure
    span = np.geomspace(table["local_error"].min(), table["local_error"].max(), 20)
    figure.add_scatter(x=span, y=fitted * span, mode="lines", name=f"fitted ratio {fitted:.3g}",
                       line={"dash": "dash", "color": "grey"})
    if bound is not None:
        figure.add_scatter(x=span, y=bound * span, mode="lines",
                           name=f"{bound_name} C_l² = {bound:.3g}", line={"color": "#e76f51"})
    figure.update_layout(margin={"t": 20})
    return figure


INVARIANCE_TITLES = {"translation": "circular shift", "deformation": "smooth deformation"}
MODEL_COLOURS = ("#264653", "#e76f51")


def invariance(table: pd.DataFrame) -> go.Figure:
    """Relative change of the features by depth: one panel per transform, one colour per model
    (a legend entry each), one line per amount, labelled in pixels at its deepest point."""
    transforms = list(dict.fromkeys(table["transform"]))
    figure = make_subplots(rows=1, cols=len(transforms), shared_yaxes=True,
                           subplot_titles=[f"{INVARIANCE_TITLES.get(t, t)} (pixels)"
                                           for t in transforms])
    moved = table[table["amount"] > 0]  # a shift of 0 changes nothing: a flat line at zero
    models = list(dict.fromkeys(table["model"]))
    in_legend: set[str] = set()
    for column, transform in enumerate(transforms, 1):
        for (model, amount), line in moved[moved["transform"] == transform].groupby(
                ["model", "amount"], sort=False):
            colour = MODEL_COLOURS[models.index(model) % len(MODEL_COLOURS)]
            figure.add_scatter(
                x=line["depth"], y=line["relative_change"], mode="lines+markers+text",
                text=[""] * (len(line) - 1) + [f"{amount:g} px"], textposition="middle right",
                name=model, legendgroup=model, showlegend=model not in in_legend,
                line={"color": colour},
                customdata=line["layer"], row=1, col=column,
                hovertemplate=f"{model}, {amount:g} px<br>%{{customdata}}<br>"
                              "change %{y:.3f}<extra></extra>")
            in_legend.add(model)
        figure.update_xaxes(title_text="layer depth", row=1, col=column)
    figure.update_yaxes(title_text="‖Φ(x) − Φ(Tx)‖ / ‖Φ(x)‖", row=1, col=1)
    figure.update_layout(margin={"t": 40}, legend_title_text="model")
    return figure


def hifi_existence(table: pd.DataFrame) -> go.Figure:
    """Median smallest share of inputs reaching the fidelity level, per layer and model."""
    long = table.melt(id_vars=["model", "layer"], value_vars=["topk_share", "random_share"],
                      var_name="search", value_name="share")
    long["series"] = long["model"] + ", " + long["search"].str.replace("_share", "")
    figure = px.bar(long, x="layer", y="share", color="series", barmode="group",
                    labels={"share": "smallest share of inputs reaching fidelity 0.8"})
    figure.add_hline(y=0.2, line_dash="dot", line_color="grey")
    figure.update_layout(margin={"t": 20})
    return figure


def channel_drivers(images: np.ndarray, maps: np.ndarray, strength: tuple[float, ...]) -> go.Figure:
    """The images that drive a channel hardest (top row) and the channel over each (bottom)."""
    count = len(images)
    figure = make_subplots(rows=2, cols=count, vertical_spacing=0.05, horizontal_spacing=0.01,
                           subplot_titles=[f"mean {s:.3g}" for s in strength])
    for column, (image, channel_map) in enumerate(zip(images, maps), 1):
        figure.add_trace(go.Heatmap(z=image, colorscale="gray", showscale=False), 1, column)
        figure.add_trace(go.Heatmap(z=channel_map, colorscale="Viridis", showscale=False), 2,
                         column)
    figure.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=None)
    figure.update_xaxes(showticklabels=False)
    figure.update_layout(height=330, margin={"t": 30, "b": 10, "l": 10, "r": 10})
    return figure


def membership(scores: pd.DataFrame) -> go.Figure:
    """The attack's loss for members and non-members of the forget class, before and after (and
    for the model retrained without the class, when there is one): overlapping histograms mean
    the attack cannot tell them apart."""
    figure = px.histogram(scores, x="loss", color="sample", facet_col="model", barmode="overlay",
                          histnorm="probability", opacity=0.6, nbins=40,
                          category_orders={"model": ["before", "after", "retrained"]},
                          labels={"loss": "cross-entropy loss"})  # under each panel
    figure.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    figure.update_layout(margin={"t": 30}, yaxis_title="share of images")
    return figure


def feature_map(frame: pd.DataFrame, forgotten: str) -> go.Figure:
    """Penultimate features of a few classes in one plane, before and after; the forgotten
    class drawn as crosses."""
    figure = px.scatter(frame, x="x", y="y", color="class", facet_col="model",
                        symbol=frame["class"].eq(forgotten).map({True: "forgotten",
                                                                 False: "kept"}),
                        category_orders={"model": ["before", "after"]}, opacity=0.7,
                        symbol_map={"forgotten": "x", "kept": "circle"},
                        labels={"x": "principal axis 1", "y": "principal axis 2"})
    figure.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    figure.update_layout(margin={"t": 30})
    return figure


ARCHITECTURE_COLOURS = {"kept": "share of its output channels kept",
                        "fidelity": "share of its output energy kept (refit)",
                        "alone": "accuracy when only its group is pruned",
                        "ms": "time per batch (ms)"}
_GROUP_PALETTE = px.colors.qualitative.Bold


def architecture(nodes: pd.DataFrame, edges: pd.DataFrame, colour: str) -> go.Figure:
    """The layers left to right in forward order, filled by `colour` (a column of `nodes`, see
    ARCHITECTURE_COLOURS); each coupled channel group has one outline colour, and its channels'
    paths from producers to consumers are arcs in that colour (taller for longer jumps)."""
    position = {layer: i for i, layer in enumerate(nodes["layer"])}
    groups = list(dict.fromkeys(g for g in nodes["writes"] if g))
    tint = {g: _GROUP_PALETTE[i % len(_GROUP_PALETTE)] for i, g in enumerate(groups)}
    figure = go.Figure()
    for group, rows in edges.groupby("group", sort=False):
        x, y = [], []
        for source, target in zip(rows["source"], rows["target"]):
            start, end = position[source], position[target]
            t = np.linspace(0, 1, 24)
            x += list(start + (end - start) * t) + [None]
            y += list(0.12 * (end - start) ** 0.7 * np.sin(np.pi * t)) + [None]
        figure.add_scatter(x=x, y=y, mode="lines", hoverinfo="skip", showlegend=False,
                           line={"color": tint.get(group, "#999"), "width": 1.5})
    hover = [f"<b>{r.name}</b> ({r.layer})<br>{r.shape}<br>{r.macs:,} MACs / input"
             f"<br>channels kept: {r.kept:.0%}"
             + ("" if np.isnan(r.fidelity) else f"<br>output energy kept: {r.fidelity:.1%}")
             + (f"<br>accuracy, only its group pruned: {r.alone:.2%}"
                if "alone" in nodes and not np.isnan(r.alone) else "")
             + (f"<br>time: {r.ms:.2f} ms" if "ms" in nodes and not np.isnan(r.ms) else "")
             for r in nodes.itertuples()]
    values = nodes[colour]
    # Shares run from 0 (or the lowest fidelity) to 1; accuracies and times over their own span.
    low = 0.0 if colour in ("kept", "ms") else float(np.nanmin(values))
    high = 1.0 if colour in ("kept", "fidelity") else float(np.nanmax(values))
    figure.add_scatter(
        x=list(range(len(nodes))), y=[0] * len(nodes), mode="markers", showlegend=False,
        hovertext=hover, hoverinfo="text",
        marker={"symbol": "square", "size": 26, "color": values, "colorscale": "Viridis",
                "cmin": low, "cmax": max(high, low + 1e-9),
                "colorbar": {"title": ARCHITECTURE_COLOURS[colour], "len": 0.8},
                "line": {"width": 4, "color": [tint.get(g, "#bbb") for g in nodes["writes"]]}})
    figure.update_xaxes(tickmode="array", tickvals=list(range(len(nodes))),
                        ticktext=list(nodes["name"]), tickangle=-40, showgrid=False,
                        zeroline=False)
    figure.update_yaxes(visible=False, range=[-0.1, 0.05 + 0.12 * max(1, len(nodes)) ** 0.7])
    figure.update_layout(height=340, margin={"t": 10, "b": 120}, plot_bgcolor="white")
    return figure
