"""Build the sdm-lm Grafana dashboard as code (grafana-foundation-sdk) and render it to JSON.

    python deploy/grafana/build_dashboards.py            # writes deploy/grafana/dashboards/sdm.json
    python deploy/grafana/build_dashboards.py --check    # exits 1 if the committed JSON is not what this builds

Needs ``pip install -r deploy/ci/requirements.txt`` (grafana-foundation-sdk). The JSON is committed, so Grafana
(deploy/docker-compose.yml provisions it) never needs this script; CI checks that the two agree and evaluates
every panel query against a real Prometheus scraping a real server (tests/test_deploy_monitoring.py).

Every query reads the metrics of server/metrics.py (prefix ``sdm_``) and filters on the ``$instance`` template
variable, whose values come from the ``sdm_bundle_info`` series of the bundles chosen in ``$model``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat, QueryEditorMode

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "dashboards" / "sdm.json"
UID = "sdm-lm-overview"

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'instance=~"$instance"'  # every query's selector
WINDOW = "$__rate_interval"
ANSWERED = f'sum(rate(sdm_requests_total{{{SEL}, outcome=~"admitted|abstained"}}[{WINDOW}]))'
ADMITTED = f'sum(rate(sdm_requests_total{{{SEL}, outcome="admitted"}}[{WINDOW}]))'


ACCURACY_WINDOW = "1d"  # labels are sparse: the accuracy panel and SDMAdmittedAccuracyBelowAlpha use a day


def wilson(successes: str, trials: str, sign: int, z: float = 1.96) -> str:
    """PromQL for the Wilson score interval's lower (sign -1) or upper (sign +1) end of successes / trials."""
    p = f"({successes} / ({trials} > 0))"
    n = f"({trials})"
    op = "-" if sign < 0 else "+"
    return (
        f"({p} + {z * z:.4f} / (2 * {n}) {op} {z} * sqrt({p} * (1 - {p}) / {n} + {z * z:.4f} / (4 * {n} ^ 2))) / (1 "
        f"+ {z * z:.4f} / {n})"
    )


def q(
    expr: str, legend: str = "", ref: str = "A", *, instant: bool = False, fmt: PromQueryFormat | None = None
) -> prometheus.Dataquery:
    query = (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend or "__auto")
        .ref_id(ref)
        .editor_mode(QueryEditorMode.CODE)
        .datasource(DS)
    )
    query = query.instant() if instant else query.range()
    if fmt is not None:
        query = query.format(fmt)
    return query


def quantiles(metric: str, by: str = "", qs=(0.1, 0.5, 0.9), label: str = "") -> list[prometheus.Dataquery]:
    group = f"{by}, le" if by else "le"
    out = []
    for i, quantile in enumerate(qs):
        name = f"p{int(round(quantile * 100))}"
        legend = f"{{{{{by}}}}} {name}" if by else (f"{label} {name}" if label else name)
        out.append(
            q(
                f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{WINDOW}])))",
                legend,
                chr(ord("A") + i),
            )
        )
    return out


def legend_table() -> common_builder.VizLegendOptions:
    return (
        common_builder.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
    )


def ts(
    title: str,
    description: str,
    targets: list,
    unit: str = "short",
    *,
    w: int = 12,
    h: int = 8,
    min_val: float | None = None,
    max_val: float | None = None,
    stack: bool = False,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .targets(targets)
        .unit(unit)
        .span(w)
        .height(h)
        .legend(legend_table())
        .line_width(1)
        .fill_opacity(10)
    )
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    if stack:
        panel = panel.stacking(common_builder.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(40)
    return panel


def st(title: str, description: str, expr: str, unit: str = "short", *, decimals: int = 2) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .targets([q(expr)])
        .unit(unit)
        .decimals(decimals)
        .span(6)
        .height(4)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def variables() -> list:
    datasource = dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
    model = (
        dash.QueryVariable("model")
        .label("Bundle / model")
        .datasource(DS)
        .query("label_values(sdm_bundle_info, model)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
    )
    instance = (
        dash.QueryVariable("instance")
        .label("Instance")
        .datasource(DS)
        .query('label_values(sdm_bundle_info{model=~"$model"}, instance)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
    )
    return [datasource, model, instance]


def build() -> dict:
    d = (
        dash.Dashboard("sdm-lm: selective generation")
        .uid(UID)
        .tags(["sdm-lm", "llm", "selective-generation"])
        .description(
            "Admitted and abstained answers against the bundle's calibration baseline, calibrated probabilities, "
            "latency by stage, load and errors of the sdm-lm server (metrics prefix sdm_)."
        )
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .variables(variables())
    )

    # -- overview ----------------------------------------------------------------------------------------------
    d = d.with_row(dash.Row("Overview"))
    d = d.with_panel(
        st("Ready instances", "Instances whose /ready answers 200 (sdm_ready).", f"sum(sdm_ready{{{SEL}}})", decimals=0)
    )
    d = d.with_panel(
        st(
            "Admitted proportion",
            "Admitted answers / all answers (admitted + abstained) over the rate window.",
            f"{ADMITTED} / {ANSWERED}",
            "percentunit",
            decimals=1,
        )
    )
    d = d.with_panel(
        st(
            "Calibration baseline",
            "The bundle's calibration-set admitted proportion at its default alpha "
            "(sdm_calibration_admitted_proportion): what the admitted proportion should be on in-distribution traffic.",
            f"avg(sdm_calibration_admitted_proportion{{{SEL}}})",
            "percentunit",
            decimals=1,
        )
    )
    d = d.with_panel(
        st(
            "Abstention alert margin",
            "How far the abstained proportion may exceed the calibration set's before "
            "SDMAbstentionAboveBaseline fires (recording rule sdm:abstention_alert_margin:ratio).",
            "max(sdm:abstention_alert_margin:ratio)",
            "percentunit",
            decimals=0,
        )
    )

    # -- selective generation ------------------------------------------------------------------------------------
    d = d.with_row(dash.Row("Selective generation"))
    d = d.with_panel(
        ts(
            "Admitted vs abstained",
            "Answers per second by outcome.",
            [
                q(
                    f'sum by (outcome) (rate(sdm_requests_total{{{SEL}, outcome=~"admitted|abstained"}}[{WINDOW}]))',
                    "{{outcome}}",
                )
            ],
            "reqps",
            stack=True,
        )
    )
    d = d.with_panel(
        ts(
            "Abstention rate by reason",
            "Share of answers abstained for each reason: ood (q = 0), no_region, "
            "low_similarity, below_threshold, predicted_no.",
            [
                q(
                    f"sum by (reason) (rate(sdm_abstentions_total{{{SEL}}}[{WINDOW}])) / ignoring (reason) group_left "
                    f"() {ANSWERED}",
                    "{{reason}}",
                )
            ],
            "percentunit",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Admitted proportion vs calibration baseline",
            "The live admitted proportion and the bundle's "
            "calibration-set proportion; a lasting gap means traffic differs from the calibration data.",
            [
                q(f"{ADMITTED} / {ANSWERED}", "admitted (live)", "A"),
                q(f"avg(sdm_calibration_admitted_proportion{{{SEL}}})", "calibration baseline", "B"),
            ],
            "percentunit",
            min_val=0,
            max_val=1,
        )
    )
    d = d.with_panel(
        ts(
            "Admitted-rate drift against calibration baseline",
            "Per instance: admitted proportion minus the "
            "calibration baseline. Below the alert line for 10 minutes, SDMAbstentionAboveBaseline fires.",
            [
                q(
                    f'sum by (instance) (rate(sdm_requests_total{{{SEL}, outcome="admitted"}}[{WINDOW}])) '
                    f'/ sum by (instance) (rate(sdm_requests_total{{{SEL}, outcome=~"admitted|abstained"}}[{WINDOW}])) '
                    f"- on (instance) max by (instance) (sdm_calibration_admitted_proportion{{{SEL}}})",
                    "{{instance}}",
                    "A",
                ),
                q("-max(sdm:abstention_alert_margin:ratio)", "alert threshold", "B"),
            ],
            "percentunit",
        )
    )
    d = d.with_panel(
        ts(
            "Out-of-distribution rate",
            "Share of answers abstained as out of distribution (q = 0: no training "
            "exemplar of the predicted class among the nearest neighbours). SDMOODSpike watches it.",
            [
                q(
                    f'(sum(rate(sdm_abstentions_total{{{SEL}, reason="ood"}}[{WINDOW}])) or on () vector(0)) / '
                    f"{ANSWERED}",
                    "ood",
                )
            ],
            "percentunit",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Attempts per request",
            "Generation attempts per request (max_attempts resamples until admitted).",
            [
                q(
                    f"sum(rate(sdm_attempts_sum{{{SEL}}}[{WINDOW}])) / "
                    f"sum(rate(sdm_attempts_count{{{SEL}}}[{WINDOW}]))",
                    "mean",
                    "A",
                ),
                q(f"histogram_quantile(0.95, sum by (le) (rate(sdm_attempts_bucket{{{SEL}}}[{WINDOW}])))", "p95", "B"),
            ],
            "short",
            min_val=0,
        )
    )

    # -- calibrated outputs ------------------------------------------------------------------------------------
    d = d.with_row(dash.Row("Calibrated outputs"))
    d = d.with_panel(
        ts(
            "Calibrated probability distribution",
            "p10 / p50 / p90 of the SDM probability of the verified class (sdm_probability).",
            quantiles("sdm_probability"),
            "percentunit",
            w=8,
            min_val=0,
            max_val=1,
        )
    )
    d = d.with_panel(
        ts(
            "q' distribution",
            "p10 / p50 / p90 of the rescaled similarity q' (sdm_q_prime); the region's q'_min is the admission floor.",
            quantiles("sdm_q_prime"),
            "short",
            w=8,
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Region alpha distribution",
            "p10 / p50 / p90 of the highest ladder alpha whose region admits the "
            "output (sdm_region_alpha; outputs in no region are counted apart).",
            quantiles("sdm_region_alpha"),
            "percentunit",
            w=8,
        )
    )
    d = d.with_panel(
        heatmap.Panel()
        .title("Calibrated probability heatmap")
        .description("Outputs per probability bucket.")
        .datasource(DS)
        .span(12)
        .height(8)
        .targets(
            [
                q(
                    f"sum by (le) (increase(sdm_probability_bucket{{{SEL}}}[{WINDOW}]))",
                    "{{le}}",
                    fmt=PromQueryFormat.HEATMAP,
                )
            ]
        )
        .calculate(False)
        .color(heatmap.HeatmapColorOptions().mode(heatmap_model.HeatmapColorMode.SCHEME).scheme("Oranges"))
    )
    d = d.with_panel(
        ts(
            "Outputs in no region",
            "Share of answers that no alpha region of the ladder admits (sdm_outputs_without_region).",
            [
                q(
                    f"(sum(rate(sdm_outputs_without_region_total{{{SEL}}}[{WINDOW}])) or on () vector(0)) / {ANSWERED}",
                    "no region",
                )
            ],
            "percentunit",
            min_val=0,
        )
    )

    # -- latency and throughput --------------------------------------------------------------------------------
    d = d.with_row(dash.Row("Latency and throughput"))
    d = d.with_panel(
        ts(
            "Latency by stage (p50 / p95 / p99)",
            "sdm_stage_latency_seconds by stage: queue (waiting for a "
            "slot), generation, verification (hidden-state pass + SDM head), total. SDMHighLatencyP95 watches total "
            "p95.",
            quantiles("sdm_stage_latency_seconds", by="stage", qs=(0.5, 0.95, 0.99)),
            "s",
            w=24,
            h=9,
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Time to first token (p50 / p95)",
            "sdm_time_to_first_token_seconds: from a request's arrival, queue included, to its first generated token, "
            "for every route and for streams (vLLM's TTFT).",
            quantiles("sdm_time_to_first_token_seconds", qs=(0.5, 0.95), label="TTFT"),
            "s",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Time per output token (p50 / p95)",
            "sdm_time_per_output_token_seconds: mean time between generated tokens after the first, per attempt "
            "(vLLM's TPOT); both backends.",
            quantiles("sdm_time_per_output_token_seconds", qs=(0.5, 0.95), label="TPOT"),
            "s",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Throughput by route",
            "Requests per second by route, all outcomes.",
            [q(f"sum by (route) (rate(sdm_requests_total{{{SEL}}}[{WINDOW}]))", "{{route}}")],
            "reqps",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Tokens",
            "Prompt tokens (once per attempt) and completion tokens (all attempts) per second.",
            [
                q(f"sum(rate(sdm_prompt_tokens_total{{{SEL}}}[{WINDOW}]))", "prompt", "A"),
                q(f"sum(rate(sdm_completion_tokens_total{{{SEL}}}[{WINDOW}]))", "completion", "B"),
            ],
            "short",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Queue depth, in-flight and 429s",
            "Requests holding a processing slot, requests waiting for one, "
            "and requests rejected with 429 because the queue was full (right axis). The HPA scales on queue depth.",
            [
                q(f"sum(sdm_in_flight_requests{{{SEL}}})", "in flight", "A"),
                q(f"sum(sdm_queue_depth{{{SEL}}})", "queued", "B"),
                q(
                    f'sum(rate(sdm_request_errors_total{{{SEL}, status="429"}}[{WINDOW}])) or on () vector(0)',
                    "429/s",
                    "C",
                ),
            ],
            "short",
            min_val=0,
        ).override_by_query(
            "C",
            [
                DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                DynamicConfigValue(id_val="unit", value="reqps"),
            ],
        )
    )
    d = d.with_panel(
        ts(
            "Batch size",
            "Mean requests per backend batch, for generation and for the hidden-state pass.",
            [
                q(
                    f"sum by (kind) (rate(sdm_batch_size_sum{{{SEL}}}[{WINDOW}])) / sum by (kind) "
                    f"(rate(sdm_batch_size_count{{{SEL}}}[{WINDOW}]))",
                    "{{kind}}",
                )
            ],
            "short",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Head inputs from generation states",
            "Share of head inputs pooled from the states captured while "
            "generating (transformers backend, SDM_HIDDEN_STATES auto/reuse); the rest ran a separate "
            "hidden-state pass. A falling share means more outputs end without the model writing <verified>.",
            [
                q(
                    f'(sum(rate(sdm_hidden_state_sources_total{{{SEL}, source="reused"}}[{WINDOW}])) or on () '
                    "vector(0)) "
                    f"/ sum(rate(sdm_hidden_state_sources_total{{{SEL}}}[{WINDOW}]))",
                    "reused share",
                )
            ],
            "percentunit",
            min_val=0,
        )
    )

    # -- live accuracy (client labels) ---------------------------------------------------------------------------
    d = d.with_row(dash.Row("Live accuracy of admitted answers"))
    labelled = (
        f'sum by (alpha) (increase(sdm_feedback_labels_total{{{SEL}, decision="admitted", '
        f'label=~"correct|wrong"}}[{ACCURACY_WINDOW}]))'
    )
    correct = (
        f'sum by (alpha) (increase(sdm_feedback_labels_total{{{SEL}, decision="admitted", '
        f'label="correct"}}[{ACCURACY_WINDOW}]))'
    )
    d = d.with_panel(
        ts(
            "Observed accuracy of admitted answers vs alpha",
            "Per alpha, over the last day: correct / (correct + "
            "wrong) among admitted answers that clients labelled (POST /v1/feedback), with its Wilson 95 % band, "
            "against the alpha itself (dashed) and the number of labels (right axis). SDMAdmittedAccuracyBelowAlpha "
            "fires when, with at least 30 labels, the whole band lies below alpha.",
            [
                q(f"{correct} / ({labelled} > 0)", "accuracy α={{alpha}}", "A"),
                q(wilson(correct, labelled, -1), "Wilson lower α={{alpha}}", "B"),
                q(wilson(correct, labelled, +1), "Wilson upper α={{alpha}}", "C"),
                q(f"max by (alpha) (sdm_ladder_alpha{{{SEL}}})", "alpha {{alpha}}", "D"),
                q(labelled, "labels α={{alpha}}", "E"),
            ],
            "percentunit",
            w=24,
            h=9,
        )
        .override_by_query(
            "E",
            [
                DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                DynamicConfigValue(id_val="unit", value="short"),
                DynamicConfigValue(id_val="custom.drawStyle", value="bars"),
            ],
        )
        .override_by_query(
            "D", [DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})]
        )
    )
    d = d.with_panel(
        ts(
            "Labels received",
            "Labels per second by the labelled answer's decision and the label.",
            [
                q(
                    f"sum by (decision, label) (rate(sdm_feedback_labels_total{{{SEL}}}[{WINDOW}]))",
                    "{{decision}} {{label}}",
                )
            ],
            "short",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Traffic store",
            "Records written per second, records dropped per second by reason (queue_full: "
            "the writer's queue was full; store_error: the store failed), and instances whose store is down "
            "(right axis; SDMTrafficStoreDown).",
            [
                q(f"sum(rate(sdm_traffic_records_written_total{{{SEL}}}[{WINDOW}]))", "written/s", "A"),
                q(
                    f"sum by (reason) (rate(sdm_traffic_records_dropped_total{{{SEL}}}[{WINDOW}]))",
                    "dropped/s {{reason}}",
                    "B",
                ),
                q(f"count(sdm_traffic_store_up{{{SEL}}} == 0) or on () vector(0)", "stores down", "C"),
            ],
            "short",
            min_val=0,
        ).override_by_query("C", [DynamicConfigValue(id_val="custom.axisPlacement", value="right")])
    )

    # -- errors ----------------------------------------------------------------------------------------------------
    d = d.with_row(dash.Row("Errors"))
    d = d.with_panel(
        ts(
            "Error rate",
            "Share of all requests answered with a server error (5xx: 500, 503, 504). "
            "SDMHighErrorRate fires above 5 %.",
            [
                q(
                    f'(sum(rate(sdm_request_errors_total{{{SEL}, status=~"5.."}}[{WINDOW}])) or on () vector(0)) '
                    f"/ sum(rate(sdm_requests_total{{{SEL}}}[{WINDOW}]))",
                    "5xx share",
                )
            ],
            "percentunit",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Errors by status",
            "Failed requests per second by HTTP status (4xx: client errors, 429: queue full, 5xx: server errors).",
            [q(f"sum by (status) (rate(sdm_request_errors_total{{{SEL}}}[{WINDOW}]))", "{{status}}")],
            "reqps",
            min_val=0,
        )
    )
    d = d.with_panel(
        ts(
            "Cancelled requests and reloads",
            "Requests whose client disconnected, and bundle reloads by result.",
            [
                q(
                    f"sum by (route) (rate(sdm_cancelled_requests_total{{{SEL}}}[{WINDOW}]))",
                    "cancelled {{route}}",
                    "A",
                ),
                q(f"sum by (result) (increase(sdm_bundle_reloads_total{{{SEL}}}[{WINDOW}]))", "reload {{result}}", "B"),
            ],
            "short",
            min_val=0,
        )
    )
    d = d.with_panel(
        table.Panel()
        .title("Bundles served")
        .description("sdm_bundle_info per instance: model, bundle, head version, default alpha and calibration facts.")
        .datasource(DS)
        .span(12)
        .height(8)
        .targets(
            [
                q(
                    "max by (instance, model, bundle, head_version, default_alpha, calibration_admitted_proportion) "
                    f"(sdm_bundle_info{{{SEL}}})",
                    instant=True,
                    fmt=PromQueryFormat.TABLE,
                )
            ]
        )
    )
    rendered = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    for number, panel in enumerate(rendered["panels"], start=1):  # stable, unique panel ids (links, viewPanel=)
        panel["id"] = number
    for variable in rendered["templating"]["list"]:
        variable["id"] = variable["name"]
    return rendered


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed JSON differs from what this builds"
    )
    parser.add_argument(
        "--out", default=str(OUTPUT), help=f"output file (default {OUTPUT.relative_to(HERE.parents[1])})"
    )
    args = parser.parse_args(argv)
    text = render()
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is stale: run python deploy/grafana/build_dashboards.py", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
