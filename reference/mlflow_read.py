"""Reads an MLflow run back with MLflow's own Python client, for tests/trackers_mlflow.rs.

Usage: mlflow_read.py TRACKING_URI EXPERIMENT RUN_NAME CONFIG_RESOLVED_YAML
Prints one JSON object: {"run_id", "status", "params": {...}, "tags": {...},
"metrics": {key: [[step, value], ...]}, "artifacts": [paths], "expected_params": {...}}.
`expected_params` is the resolved config flattened here, independently of VoltTrain: nested keys
joined with ".", strings as they are, everything else as compact JSON with sorted keys.
"""
import json
import sys

import yaml
from mlflow.tracking import MlflowClient


def flatten(prefix, v, out):
    if isinstance(v, dict) and v:
        for k, x in v.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), x, out)
    elif isinstance(v, str):
        out[prefix] = v
    else:
        out[prefix] = json.dumps(v, separators=(",", ":"), sort_keys=True)


def artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out.extend(artifacts(client, run_id, f.path))
        else:
            out.append(f.path)
    return out


def main():
    uri, experiment, run_name, config = sys.argv[1:5]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    rid = run.info.run_id
    metrics = {}
    for key in run.data.metrics:
        hist = client.get_metric_history(rid, key)
        metrics[key] = sorted([m.step, m.value] for m in hist)
    expected = {}
    with open(config, encoding="utf-8") as f:
        flatten("", yaml.safe_load(f), expected)
    print(json.dumps({
        "run_id": rid,
        "status": run.info.status,
        "params": run.data.params,
        "tags": run.data.tags,
        "metrics": metrics,
        "artifacts": sorted(artifacts(client, rid)),
        "expected_params": expected,
    }))


if __name__ == "__main__":
    main()
