"""The pages a browser gets: ``/projects`` (the projects served) and ``/projects/<id>`` (what each round learnt, how
its boxes matched the annotators', the round now running).

Server-rendered HTML with inline SVG charts and a few lines of script (no front-end build, nothing fetched from
elsewhere: the page works without internet access). Everything shown comes from what the backend already holds:
the registry's version records and the project's status in Redis (:meth:`TrainingQueue.status
<ale_backend.training_queue.TrainingQueue.status>`); a page load never calls Label Studio. The running round's part
asks ``/status`` again every few seconds and updates itself without a reload.

Strings from elsewhere (version names, reasons, class names from a labelling config) are escaped by Jinja's
autoescape; the status goes into the script as JSON that cannot close the ``<script>`` element.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import Environment
from markupsafe import Markup

from ale_backend.registry import VersionInfo

_env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%}th,td{padding:.25em .5em;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176}.no{color:#a22}.muted{color:#777}.bar{background:#eee;height:.8em;width:20em;display:inline-block}
.bar span{display:block;height:100%;background:#2a7}.problem{background:#fee;padding:.5em;border:1px solid #c88}
small{color:#666}svg text{font:11px system-ui,sans-serif}
"""

_PROJECTS = _env.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ALE backend: projects</title>
<style>{{ style }}</style></head><body>
<h1>Projects</h1>
<p class="muted">Models in {{ location }}</p>
{% if problem %}<p class="problem">{{ problem }}</p>{% endif %}
{% if rows %}
<table><thead><tr><th>project</th><th>served version</th><th>last round</th></tr></thead><tbody>
{% for row in rows %}
<tr><td><a href="projects/{{ row.project }}">project {{ row.project }}</a></td>
<td>{{ row.version or "the base model" }}</td>
<td>{% if row.last %}{{ row.last.created_at }}: {{ row.last.version }}
 <span class="{{ 'ok' if row.last.promoted else 'no' }}">{{ "served" if row.last.promoted else "not served" }}</span>
 {% else %}<span class="muted">none yet</span>{% endif %}</td></tr>
{% endfor %}
</tbody></table>
{% else %}<p>No project yet: connect one (<code>python -m ale_backend connect --project &lt;id&gt; ...</code>).</p>
{% endif %}
</body></html>
""")

_PROJECT = _env.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ALE backend: project {{ project }}</title>
<style>{{ style }}</style></head><body>
<p><a href="../projects">all projects</a></p>
<h1>Project {{ project }}</h1>
<p>Served: <strong id="served">{{ served or "the base model" }}</strong>
{% if label_studio %} &middot;
<a href="{{ label_studio }}/projects/{{ project }}/data">the project in Label Studio</a>{% endif %} &middot;
<span class="muted">models in {{ location }}</span></p>
{% for problem in problems %}<p class="problem">{{ problem }}</p>{% endfor %}

<h2>The round now</h2>
<div id="round">{{ round_html }}</div>

<h2>What each round learnt</h2>
{% if versions %}
{{ chart }}
<table id="versions"><thead><tr><th>version</th><th>when</th><th>from</th><th class="n">images</th>
<th class="n">boxes</th><th class="n">mAP50-95</th><th>per class</th><th>served?</th><th class="n">round</th>
</tr></thead>
<tbody>
{% for v in versions %}
<tr data-version="{{ v.version }}">
<td>{{ v.version }}{% if v.version == served %} <strong>(served)</strong>{% endif %}</td>
<td>{{ v.created_at }}</td><td>{{ v.parent }}</td><td class="n">{{ v.annotations }}</td>
<td class="n">{{ v.boxes }}</td>
<td class="n map">{{ "%.3f"|format(v.map) if v.map is not none else "" }}</td>
<td>{% for name, value, new in v.per_class %}{{ name }} {{ "%.3f"|format(value) }}
{%- if new %} <strong>new</strong>{% endif %}{% if not loop.last %}, {% endif %}{% endfor %}</td>
<td class="{{ 'ok' if v.promoted else 'no' }}">{{ "served" if v.promoted else "refused" }}
<br><small>{{ v.reason }}</small></td>
<td class="n">{{ v.minutes }}</td></tr>
{% endfor %}
</tbody></table>
{% else %}<p>No round yet: the base model serves this project. Rounds start after annotations come in, or with
<em>Start Training</em> in Label Studio.</p>{% endif %}

<h2>The queue</h2>
{% if queue.next %}
<p>Unlabelled tasks scored, by version: {% for version, count in queue.scored.items() %}{{ version }}: {{ count }}
{%- if not loop.last %}, {% endif %}{% endfor %}. Label Studio serves the lowest priority score first, so the
highest ALE score; these are the next tasks of {{ queue.version }}:</p>
{{ histogram }}
<table id="next"><thead><tr><th class="n">#</th><th>task</th><th class="n">ALE score</th><th class="n">priority</th>
<th>predicted classes</th></tr></thead><tbody>
{% for item in queue.next %}
<tr data-task="{{ item.task }}"><td class="n">{{ loop.index }}</td>
<td>{% if label_studio %}
<a href="{{ label_studio }}/projects/{{ project }}/data?task={{ item.task }}">task {{ item.task }}</a>
{%- else %}task {{ item.task }}{% endif %}</td>
<td class="n ale">{{ "%.4f"|format(item.ale) if item.ale is not none else "" }}</td>
<td class="n">{{ "%.6f"|format(item.priority) }}</td><td>{{ item.classes|join(", ") or "nothing found" }}</td></tr>
{% endfor %}
</tbody></table>
{% elif queue.scored %}<p>Unlabelled tasks scored, by version: {% for version, count in queue.scored.items() %}
{{ version }}: {{ count }}{% if not loop.last %}, {% endif %}{% endfor %}; none yet with {{ queue.version }}.</p>
{% else %}<p class="muted">No scores recorded yet: they are recorded as the backend imports its predictions (a
re-scoring of the pool, new tasks).</p>{% endif %}

<h2>How each version's boxes matched the annotators'</h2>
{% if agreement %}
<p class="muted">Each version's pre-annotations compared with the boxes annotators submitted from them (IoU 0.5; kept:
the box left as it was, IoU 0.9).</p>
<table id="agreement"><thead><tr><th>version</th><th class="n">tasks</th><th class="n">precision</th>
<th class="n">recall</th><th class="n">AP50</th><th class="n">kept</th></tr></thead><tbody>
{% for version, a in agreement %}
<tr data-version="{{ version }}"><td>{{ version }}</td><td class="n">{{ a.tasks }}</td>
{% if a.note %}<td colspan="4" class="muted">{{ a.note }}</td>{% else %}
{% for key in ("precision", "recall", "ap50", "kept") %}
<td class="n {{ key }}">{{ "%.3f"|format(a[key]) if a[key] is not none else "" }}</td>{% endfor %}
{% endif %}</tr>
{% endfor %}
</tbody></table>
{% else %}<p class="muted">Not measured yet: a round measures the version that was served while annotations were
made from its pre-annotations.</p>{% endif %}

<script id="status" type="application/json">{{ status_json }}</script>
<script>
(function () {
  var project = {{ project }};
  function text(s) { return document.createTextNode(s); }
  function show(status) {
    var box = document.getElementById("round"), job = status.running || status.waiting;
    box.textContent = "";
    if (status.scoring) {
      var s = document.createElement("p"), parts = status.scoring.parts;
      s.appendChild(text("Scoring: " + (status.scoring.stage || status.scoring.status || "") +
        (parts ? " (" + (parts.finished || 0) + " of " + parts.of + " parts done)" : "")));
      box.appendChild(s);
    }
    if (!job) { box.appendChild(text("No round is running or waiting.")); return; }
    var p = document.createElement("p");
    p.appendChild(text((status.running ? "Running: " : "Waiting: ") + (job.stage || job.status || "")));
    if (job.epoch !== undefined && job.epochs) {
      p.appendChild(text(", epoch " + job.epoch + " of " + job.epochs));
      if (job.left_s !== undefined) p.appendChild(text(", about " + Math.ceil(job.left_s / 60) + " min left"));
      var bar = document.createElement("div"), fill = document.createElement("span");
      bar.className = "bar"; fill.style.width = (100 * job.epoch / job.epochs) + "%"; bar.appendChild(fill);
      box.appendChild(p); box.appendChild(bar); return;
    }
    box.appendChild(p);
  }
  show(JSON.parse(document.getElementById("status").textContent));
  setInterval(function () {
    fetch("../status?project=" + project, {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) { if (s) show(s); })
      .catch(function () {});
  }, {{ refresh_ms }});
})();
</script>
</body></html>
""")


def projects_page(location: str, rows: list[dict[str, Any]], problem: str | None = None) -> str:
    """The list of projects: ``rows`` of ``{"project", "version" (served), "last" (the newest VersionInfo)}``."""
    return _PROJECTS.render(style=Markup(_STYLE), location=location, rows=rows, problem=problem)


def project_page(project: int, status: dict[str, Any], versions: list[VersionInfo], location: str,
                 problems: list[str], queue: dict[str, Any] | None = None, refresh_ms: int = 3000) -> str:
    """A project's page from its status (``TrainingQueue.status``), its versions, oldest first, and its queue
    (:meth:`ScoredPool.summary <ale_backend.scored_pool.ScoredPool.summary>`)."""
    queue = queue or {"scored": {}, "next": [], "histogram": None, "version": None}
    rows = _version_rows(versions)
    agreement = status.get("agreement") or {}
    agreement = [(v, a) for v, a in agreement.items() if isinstance(a, dict)] if isinstance(agreement, dict) else []
    label_studio = (status.get("label_studio") or {}).get("url")
    return _PROJECT.render(
        style=Markup(_STYLE), project=int(project), served=status.get("current_version"), location=location,
        label_studio=label_studio, problems=[p for p in problems if p], versions=rows,
        chart=Markup(_chart(rows, dict(agreement))), agreement=agreement,
        round_html=_round_text(status), refresh_ms=int(refresh_ms), queue=queue,
        histogram=Markup(_histogram(queue.get("histogram"))),
        status_json=Markup(json.dumps(status, default=str).replace("<", "\\u003c")),
    )


def _round_text(status: dict[str, Any]) -> str:
    """What the round part says before its script runs (the script says the same, and keeps it fresh)."""
    job = status.get("running") or status.get("waiting")
    scoring = status.get("scoring")
    said = ""
    if scoring:
        parts = scoring.get("parts")
        said = f"Scoring: {scoring.get('stage') or scoring.get('status') or ''}" + (
            f" ({parts.get('finished', 0)} of {parts['of']} parts done)" if isinstance(parts, dict) else "") + ". "
    if not job:
        return said + "No round is running or waiting."
    said += f"{'Running' if status.get('running') else 'Waiting'}: {job.get('stage') or job.get('status') or ''}"
    if job.get("epoch") is not None and job.get("epochs"):
        said += f", epoch {job['epoch']} of {job['epochs']}"
    return said


def _histogram(histogram: dict[str, Any] | None, width: int = 420, height: int = 110) -> str:
    """The queue's ALE scores in equal bins from 0 to the highest, as inline SVG bars."""
    if not histogram or not any(histogram["counts"]):
        return ""
    counts, top = histogram["counts"], histogram["upper"]
    most, left, bottom = max(counts), 30, height - 20
    step = (width - left - 10) / len(counts)
    parts = [f'<svg id="histogram" width="{width}" height="{height}" role="img" '
             'aria-label="distribution of the ALE scores of the queue">']
    for i, count in enumerate(counts):
        bar = (bottom - 10) * count / most
        parts.append(f'<rect x="{left + i * step + 1:.1f}" y="{bottom - bar:.1f}" width="{step - 2:.1f}" '
                     f'height="{bar:.1f}" fill="#2a7"><title>{count} tasks</title></rect>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{width - 10}" y2="{bottom}" stroke="#999"/>')
    parts.append(f'<text x="{left}" y="{height - 5}">0</text><text x="{width - 10}" y="{height - 5}" '
                 f'text-anchor="end">ALE score {top:g}</text><text x="{left - 4}" y="18" '
                 f'text-anchor="end">{most}</text></svg>')
    return "".join(parts)


def _version_rows(versions: list[VersionInfo]) -> list[dict[str, Any]]:
    rows, known = [], None
    for info in versions:
        per_class = sorted((key.split("/", 1)[1], value) for key, value in info.metrics.items()
                           if key.startswith("map50_95/") and isinstance(value, (int, float)))
        if known is None:  # the first round: the classes its parent (the base model) was scored on
            known = {key.split("/", 1)[1] for key in info.metrics if key.startswith("parent_map50_95/")}
        new = {name for name, _ in per_class} - known
        rows.append({"version": info.version, "created_at": info.created_at.replace("T", " ")[:16],
                     "parent": info.parent, "annotations": info.annotations, "boxes": info.boxes,
                     "map": info.metrics.get("map50_95"), "per_class": [(n, v, n in new) for n, v in per_class],
                     "new": sorted(new), "promoted": info.promoted, "reason": info.reason,
                     "minutes": f"{info.train_seconds / 60:.1f} min"})
        known |= {name for name, _ in per_class}
    return rows


def _chart(rows: list[dict[str, Any]], agreement: dict[str, dict[str, Any]], width: int = 640,
           height: int = 220) -> str:
    """Validation mAP50-95 of each version (hollow: refused) and the agreement (AP50) of the versions measured,
    against the images trained on; a version that learnt a new class is marked with its name. Inline SVG."""
    points = [(row["annotations"], row["map"], row) for row in rows if row["map"] is not None]
    # a version's agreement at the images it was trained on; the first round's parent (the base model) at 0
    trained_on = {row["version"]: row["annotations"] for row in rows}
    if rows:
        trained_on.setdefault(rows[0]["parent"], 0)
    measured = sorted((trained_on[version], figures["ap50"]) for version, figures in agreement.items()
                      if version in trained_on and isinstance(figures, dict) and figures.get("ap50") is not None)
    if not points:
        return ""
    left, bottom, top, right = 40, height - 30, 15, width - 15
    most = max(x for x, _, _ in points) or 1

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (right - left) * x / most, bottom - (bottom - top) * max(0.0, min(1.0, y))

    parts = [f'<svg id="chart" width="{width}" height="{height}" role="img" '
             'aria-label="validation mAP50-95 and agreement against images trained on">',
             f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#999"/>']
    for tick in (0.0, 0.5, 1.0):
        _, y = at(0, tick)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    parts.append(f'<text x="{right}" y="{height - 6}" text-anchor="end">images trained on (max {most})</text>')
    for series, colour, name in ((points, "#2a7", "validation mAP50-95"),
                                 ([(x, y, None) for x, y in measured], "#c60", "agreement AP50")):
        if not series:
            continue
        coords = [at(x, y) for x, y, _ in series]
        parts.append(f'<polyline class="{name.split()[0]}" fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>')
        for (x, y), (_, _, row) in zip(coords, series):  # a refused version: a hollow point
            fill = "#fff" if row is not None and not row["promoted"] else colour
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{fill}" stroke="{colour}"/>')
    for x, y, row in points:
        if row["new"]:
            cx, cy = at(x, y)
            label = ", ".join(row["new"]).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            parts.append(f'<text class="new" x="{cx:.1f}" y="{cy - 8:.1f}" text-anchor="middle">+ {label}</text>')
    parts.append(f'<text x="{left + 8}" y="{top + 10}" fill="#2a7">validation mAP50-95</text>')
    parts.append(f'<text x="{left + 160}" y="{top + 10}" fill="#c60">agreement AP50</text>')
    parts.append("</svg>")
    return "".join(parts)
