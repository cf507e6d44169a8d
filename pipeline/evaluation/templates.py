"""Jinja2 templates of the evaluation report (kept in Python so every install ships them).

The HTML one is rendered with autoescaping on: model samples routinely contain ``<``.
The Markdown one escapes table cells with the ``cell`` filter and puts free text in fences.
"""

SECTIONS = (
    "Summary",
    "Release gate",
    "Metrics",
    "Comparison with the parent run",
    "Training curves",
    "Data funnel",
    "Tokenizer",
    "Samples",
    "Held-out Q&A examples",
    "Lineage",
)

MARKDOWN = """\
# Evaluation report

## Summary

**{{ headline }}**

{% for note in notes %}- {{ note | text }}
{% endfor %}
## Release gate

**{{ gate.status }}**: {{ gate.reason | text }}

{% if gate.rules %}| rule | parent | this run | change | limit | result |
| --- | ---: | ---: | --- | ---: | --- |
{% for r in gate.rules %}| {{ r.metric | cell }} | {{ r.parent | num }} | {{ r.current | num }} | {{ r.why | cell }} | {{ r.max_regression | pct }} | {{ r.status }} |
{% endfor %}{% endif %}
## Metrics

Every model scores exactly the same {{ val_tokens }} held-out tokens ({{ val_bytes }} bytes of UTF-8 text): \
tokens 1..N-1 of the first N = {{ val_tokens + 1 }} tokens of the val split. {{ window_note }}

| model | val bits/byte | val perplexity | BLEU | ROUGE-1 | ROUGE-2 | ROUGE-L |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{% for r in rows %}| {{ r.label | cell }} | {{ r.val_bpb | num }} | {{ r.val_ppl | num(2) }} | {{ r.bleu | num(2) }} | {{ r.rouge1 | num(2) }} | {{ r.rouge2 | num(2) }} | {{ r.rougeL | num(2) }} |
{% endfor %}
BLEU (sacrebleu corpus BLEU) and ROUGE-1/2/L (mean per-pair F1 over lowercased words, CJK characters as \
single tokens, x100) on {{ heldout_pairs }} held-out fine-tuning pairs, greedy decoding, at most \
{{ max_new_tokens }} new tokens.

{% if plots.metrics %}![metric comparison]({{ plots.metrics }})
{% endif %}
## Comparison with the parent run

{% if parent %}Parent: run {{ parent.run }} ({{ parent.created }}, `{{ parent.source }}`, code `{{ parent.code_version }}`); \
{{ parent.heldout_note | text }}.

| metric | parent | this run | change | relative | flag |
| --- | ---: | ---: | ---: | ---: | --- |
{% for c in changes %}| {{ c.metric | cell }} | {{ c.parent | num }} | {{ c.current | num }} | {{ c.delta | signed }} | {{ c.relative | pct }} | {{ c.flag }} |
{% endfor %}
{% if config_diff %}Config changes since the parent run:

| key | parent | this run |
| --- | --- | --- |
{% for d in config_diff %}| {{ d.key | cell }} | {{ d.parent | cell }} | {{ d.current | cell }} |
{% endfor %}{% else %}No config changes since the parent run.
{% endif %}{% else %}No parent run: this is the first published evaluation in this workspace (or `eval.parent` is unset and the history is empty).
{% endif %}
## Training curves

{% if plots.curves %}![training curves]({{ plots.curves }})
{% endif %}{% for c in curves %}- {{ c | cell }}
{% endfor %}
## Data funnel

{% if funnel %}{{ funnel.in }} documents in, {{ funnel.kept }} kept.

| step | in | out | removed |
| --- | ---: | ---: | ---: |
{% for s in funnel.steps %}| {{ s.step | cell }} | {{ s.in }} | {{ s.out }} | {{ s.removed }} |
{% endfor %}
{% if funnel.rejected %}| rejection reason | documents |
| --- | ---: |
{% for reason, n in funnel.rejected %}| {{ reason | cell }} | {{ n }} |
{% endfor %}{% endif %}
{% if plots.funnel %}![data funnel]({{ plots.funnel }})
{% endif %}{% else %}{{ funnel_note | cell }}
{% endif %}
## Tokenizer

| | |
| --- | ---: |
{% for k, v in tokenizer %}| {{ k | cell }} | {{ v | cell }} |
{% endfor %}
## Samples

Greedy continuations ({{ max_new_tokens }} new tokens at most) of the configured prompts.
{% for s in samples %}
### Prompt {{ loop.index }}

{{ s.prompt | fence }}
{% for name, text in s.outputs %}
{{ name }}:

{{ text | fence }}
{% endfor %}{% endfor %}
## Held-out Q&A examples

{% if qa %}| question | reference |{% for m in qa_models %} {{ m }} |{% endfor %}
| --- | --- |{% for m in qa_models %} --- |{% endfor %}
{% for q in qa %}| {{ q.question | cell }} | {{ q.reference | cell }} |{% for m in qa_models %} {{ q.outputs[m] | cell }} |{% endfor %}
{% endfor %}{% else %}{{ qa_note | cell }}
{% endif %}
## Lineage

| artifact | path | sha256 |
| --- | --- | --- |
{% for a in lineage %}| {{ a.name }} | {{ a.path | cell }} | `{{ a.sha256 }}` |
{% endfor %}
| config group | sha256 (first 16) |
| --- | --- |
{% for g, h in stage_configs %}| {{ g }} | `{{ h }}` |
{% endfor %}
Config sha256: `{{ config_sha256 }}`. Code version: `{{ code_version }}`.
"""

HTML = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation report</title>
<style>
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 70rem;
       margin: 2rem auto; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: .8rem 0; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; vertical-align: top; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f8fa; }
pre { background: #f6f8fa; padding: .6rem; white-space: pre-wrap; word-break: break-word; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9em; }
img { max-width: 100%; height: auto; }
.headline { font-size: 1.2rem; font-weight: 600; padding: .6rem; border-radius: 6px; }
.good { background: #dafbe1; } .bad { background: #ffebe9; }
.note { color: #59636e; }
.gate { font-size: 1.3rem; font-weight: 700; padding: .5rem .8rem; border-radius: 6px; display: inline-block; }
.PASSED, .passed, .better { background: #dafbe1; } .FAILED, .worse { background: #ffebe9; }
.SKIPPED { background: #fff8c5; }
</style>
</head>
<body>
<h1>Evaluation report</h1>

<h2 id="summary">Summary</h2>
<p class="headline {{ 'good' if beats else 'bad' }}">{{ headline }}</p>
<ul>{% for note in notes %}<li>{{ note }}</li>{% endfor %}</ul>

<h2 id="release-gate">Release gate</h2>
<p><span class="gate {{ gate.status }}" id="gate-status">{{ gate.status }}</span> {{ gate.reason }}</p>
{% if gate.rules %}<table>
<tr><th>rule</th><th>parent</th><th>this run</th><th>change</th><th>limit</th><th>result</th></tr>
{% for r in gate.rules %}<tr><td>{{ r.metric }}</td><td class="num">{{ r.parent | num }}</td><td class="num">{{ r.current | num }}</td>
<td>{{ r.why }}</td><td class="num">{{ r.max_regression | pct }}</td><td class="{{ r.status }}">{{ r.status }}</td></tr>
{% endfor %}</table>{% endif %}

<h2 id="metrics">Metrics</h2>
<p>Every model scores exactly the same {{ val_tokens }} held-out tokens ({{ val_bytes }} bytes of UTF-8 text):
tokens 1..N-1 of the first N = {{ val_tokens + 1 }} tokens of the val split. {{ window_note }}</p>
<table>
<tr><th>model</th><th>val bits/byte</th><th>val perplexity</th><th>BLEU</th><th>ROUGE-1</th><th>ROUGE-2</th><th>ROUGE-L</th></tr>
{% for r in rows %}<tr><td>{{ r.label }}</td><td class="num">{{ r.val_bpb | num }}</td><td class="num">{{ r.val_ppl | num(2) }}</td>
<td class="num">{{ r.bleu | num(2) }}</td><td class="num">{{ r.rouge1 | num(2) }}</td><td class="num">{{ r.rouge2 | num(2) }}</td><td class="num">{{ r.rougeL | num(2) }}</td></tr>
{% endfor %}</table>
<p class="note">BLEU (sacrebleu corpus BLEU) and ROUGE-1/2/L (mean per-pair F1 over lowercased words, CJK characters
as single tokens, x100) on {{ heldout_pairs }} held-out fine-tuning pairs, greedy decoding, at most {{ max_new_tokens }} new tokens.</p>
{% if images.metrics %}<img alt="metric comparison" src="{{ images.metrics }}">{% endif %}

<h2 id="comparison-with-the-parent-run">Comparison with the parent run</h2>
{% if parent %}<p>Parent: run {{ parent.run }} ({{ parent.created }}, <code>{{ parent.source }}</code>, code
<code>{{ parent.code_version }}</code>); {{ parent.heldout_note }}.</p>
<table>
<tr><th>metric</th><th>parent</th><th>this run</th><th>change</th><th>relative</th><th>flag</th></tr>
{% for c in changes %}<tr><td>{{ c.metric }}</td><td class="num">{{ c.parent | num }}</td><td class="num">{{ c.current | num }}</td>
<td class="num">{{ c.delta | signed }}</td><td class="num">{{ c.relative | pct }}</td><td class="{{ c.flag }}">{{ c.flag }}</td></tr>
{% endfor %}</table>
{% if config_diff %}<p>Config changes since the parent run:</p>
<table>
<tr><th>key</th><th>parent</th><th>this run</th></tr>
{% for d in config_diff %}<tr><td><code>{{ d.key }}</code></td><td><code>{{ d.parent }}</code></td><td><code>{{ d.current }}</code></td></tr>
{% endfor %}</table>{% else %}<p>No config changes since the parent run.</p>{% endif %}
{% else %}<p class="note">No parent run: this is the first published evaluation in this workspace (or
<code>eval.parent</code> is unset and the history is empty).</p>{% endif %}

<h2 id="training-curves">Training curves</h2>
{% if images.curves %}<img alt="training curves" src="{{ images.curves }}">{% endif %}
<ul>{% for c in curves %}<li>{{ c }}</li>{% endfor %}</ul>

<h2 id="data-funnel">Data funnel</h2>
{% if funnel %}<p>{{ funnel.in }} documents in, {{ funnel.kept }} kept.</p>
<table>
<tr><th>step</th><th>in</th><th>out</th><th>removed</th></tr>
{% for s in funnel.steps %}<tr><td>{{ s.step }}</td><td class="num">{{ s.in }}</td><td class="num">{{ s.out }}</td><td class="num">{{ s.removed }}</td></tr>
{% endfor %}</table>
{% if funnel.rejected %}<table>
<tr><th>rejection reason</th><th>documents</th></tr>
{% for reason, n in funnel.rejected %}<tr><td>{{ reason }}</td><td class="num">{{ n }}</td></tr>
{% endfor %}</table>{% endif %}
{% if images.funnel %}<img alt="data funnel" src="{{ images.funnel }}">{% endif %}
{% else %}<p class="note">{{ funnel_note }}</p>{% endif %}

<h2 id="tokenizer">Tokenizer</h2>
<table>
{% for k, v in tokenizer %}<tr><th>{{ k }}</th><td class="num">{{ v }}</td></tr>
{% endfor %}</table>

<h2 id="samples">Samples</h2>
<p class="note">Greedy continuations ({{ max_new_tokens }} new tokens at most) of the configured prompts.</p>
{% for s in samples %}<h3>Prompt {{ loop.index }}</h3>
<pre><code>{{ s.prompt }}</code></pre>
{% for name, text in s.outputs %}<p>{{ name }}:</p>
<pre><code>{{ text }}</code></pre>
{% endfor %}{% endfor %}

<h2 id="held-out-qa-examples">Held-out Q&amp;A examples</h2>
{% if qa %}<table>
<tr><th>question</th><th>reference</th>{% for m in qa_models %}<th>{{ m }}</th>{% endfor %}</tr>
{% for q in qa %}<tr><td>{{ q.question }}</td><td>{{ q.reference }}</td>{% for m in qa_models %}<td>{{ q.outputs[m] }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p class="note">{{ qa_note }}</p>{% endif %}

<h2 id="lineage">Lineage</h2>
<table>
<tr><th>artifact</th><th>path</th><th>sha256</th></tr>
{% for a in lineage %}<tr><td>{{ a.name }}</td><td><code>{{ a.path }}</code></td><td><code>{{ a.sha256 }}</code></td></tr>
{% endfor %}</table>
<table>
<tr><th>config group</th><th>sha256 (first 16)</th></tr>
{% for g, h in stage_configs %}<tr><td>{{ g }}</td><td><code>{{ h }}</code></td></tr>
{% endfor %}</table>
<p>Config sha256: <code>{{ config_sha256 }}</code>. Code version: <code>{{ code_version }}</code>.</p>
</body>
</html>
"""
