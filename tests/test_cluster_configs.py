"""cluster/: the Ray autoscaler YAMLs validate against Ray's own schema, the KubeRay manifests against the CRDs'
openAPIV3Schema, and every cluster offers what dsmath/configs/deepseekmath_7b.yaml asks for."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from dsmath.config import TrainConfig, load_config
from wiring.jobsubmit import DEFAULT_EXCLUDES

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_YAMLS = ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"]
K8S = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # locate the package without importing it (slow)
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=None)
def _crd_schema(crd_file: str) -> dict:
    # The CRDs are ~25k lines: parse with libyaml when available, once per file.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CLUSTER / "schemas" / crd_file).read_text(encoding="utf-8"), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


# ---------------------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("name", RAY_YAMLS)
def test_ray_cluster_yaml_validates_against_ray_schema(name: str, ray_schema: dict) -> None:
    jsonschema.validate(_load(CLUSTER / name), ray_schema)


def test_ray_schema_rejects_a_broken_cluster_yaml(ray_schema: dict) -> None:
    # The validation above can fail: a fractional custom resource and an unknown key are both refused.
    bad = _load(CLUSTER / "aws-gpu.yaml")
    bad["available_node_types"]["gpu_generator"]["resources"]["generator"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)
    bad = _load(CLUSTER / "aws-gpu.yaml")
    bad["min_workers"] = 1  # not a top-level key in Ray's schema
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema)


def test_ray_own_validator_accepts_the_yamls() -> None:
    # Ray's validate_config adds checks beyond the schema (head_node_type among the node types, ...);
    # for on-prem, Ray first rewrites the config into its single local node type.
    from ray.autoscaler._private.local.config import prepare_local
    from ray.autoscaler._private.util import validate_config

    for name in RAY_YAMLS:
        config = _load(CLUSTER / name)
        config.setdefault("cluster_synced_files", [])  # Ray fills this default before validating
        if config["provider"]["type"] == "local":
            config, _ = prepare_local(config)
        validate_config(config)


@pytest.mark.parametrize("manifest,crd", sorted(K8S.items()))
def test_kuberay_manifest_validates_against_crd(manifest: str, crd: str) -> None:
    doc = _load(CLUSTER / "k8s" / manifest)
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, _crd_schema(crd))


def test_crd_schema_rejects_a_broken_manifest() -> None:
    schema = _crd_schema("ray.io_rayclusters.yaml")
    bad = _load(CLUSTER / "k8s" / "raycluster.yaml")
    bad["spec"]["workerGroupSpecs"][0]["resources"]["generator"] = 8  # must be a string in the CRD
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = _load(CLUSTER / "k8s" / "raycluster.yaml")
    del bad["spec"]["workerGroupSpecs"][1]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_rayjob_runs_the_same_cluster_as_raycluster() -> None:
    cluster = _load(CLUSTER / "k8s" / "raycluster.yaml")
    job = _load(CLUSTER / "k8s" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["entrypoint"].startswith("dsmath train --config deepseekmath_7b")
    assert json.loads(job["spec"]["entrypointResources"]) == {"driver": 1}


# ---------------------------------------------------------------------------------------------- capacity
def _node_types(name: str) -> list[dict]:
    """Every cluster file as node types: {name, resources (incl. CPU/GPU), min, max}."""
    if name.startswith("k8s/"):
        doc = _load(CLUSTER / name)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        out = []
        groups = [{"groupName": "head", "minReplicas": 1, "maxReplicas": 1, **spec["headGroupSpec"]}]
        for g in groups + spec["workerGroupSpecs"]:
            (container,) = g["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            res = {k: float(v) for k, v in g.get("resources", {}).items()}
            res["CPU"] = float(limits["cpu"])
            res["GPU"] = float(limits.get("nvidia.com/gpu", 0))
            out.append({"name": g["groupName"], "resources": res, "min": g["minReplicas"], "max": g["maxReplicas"]})
        return out
    config = _load(CLUSTER / name)
    if config["provider"]["type"] == "local":
        meta = config["metadata"]
        ips = [config["provider"]["head_ip"], *config["provider"]["worker_ips"]]
        assert sorted(meta["dsmath_node_resources"]) == sorted(ips) == sorted(meta["dsmath_node_hardware"])
        return [
            {"name": ip, "resources": {**meta["dsmath_node_hardware"][ip], **meta["dsmath_node_resources"][ip]},
             "min": 1, "max": 1}
            for ip in ips
        ]
    out = []
    for type_name, t in config["available_node_types"].items():
        n = (1, 1) if type_name == config["head_node_type"] else (t.get("min_workers", 0), t["max_workers"])
        out.append({"name": type_name, "resources": dict(t["resources"]), "min": n[0], "max": n[1]})
    return out


def capacity_problems(node_types: list[dict], cfg: TrainConfig) -> list[str]:
    """What the cluster lacks for ``cfg``; empty when every role fits. Roles are custom resources; each slot
    of a role gets the node's CPUs/GPUs divided by its role slots."""
    problems = []
    needs = {
        # role: (count, gpus per slot, cpus per slot, must be up at min size)
        "generator": (cfg.rollout.num_generators, cfg.rollout.gpus_per_generator, cfg.rollout.cpus_per_generator, True),
        "learner": (cfg.learner.num_ranks, cfg.learner.gpus_per_rank, cfg.learner.cpus_per_rank, True),
        "reward": (cfg.reward.num_workers, 0.0, 1.0, False),
        "driver": (1, 0.0, 1.0, True),
    }
    for role, (count, gpus, cpus, at_min) in needs.items():
        offering = [t for t in node_types if t["resources"].get(role, 0) > 0]
        if not offering:
            problems.append(f"no node type offers '{role}'")
            continue
        for t in offering:
            slots = t["resources"][role]
            if t["resources"].get("GPU", 0) / slots < gpus:
                problems.append(f"{t['name']}: {role} slots get {t['resources'].get('GPU', 0) / slots} GPU < {gpus}")
            if t["resources"].get("CPU", 0) / slots < cpus:
                problems.append(f"{t['name']}: {role} slots get {t['resources']['CPU'] / slots} CPU < {cpus}")
        have = sum(t["resources"][role] * (t["min"] if at_min else t["max"]) for t in offering)
        if have < count:
            problems.append(f"'{role}': {have:g} slots {'at min size' if at_min else 'at most'}, config asks {count}")
    # The learner's ranks share one node (NVLink for ZeRO collectives).
    if max(t["resources"].get("learner", 0) for t in node_types) < cfg.learner.num_ranks:
        problems.append(f"no node holds all {cfg.learner.num_ranks} learner ranks")
    if not any(t["resources"].get("sandbox", 0) > 0 for t in node_types):
        problems.append("no node type offers 'sandbox'")
    # No idle accelerators at min size: every GPU is a generator's or a learner's.
    gpus_min = sum(t["resources"].get("GPU", 0) * t["min"] for t in node_types)
    gpus_used = (
        cfg.rollout.num_generators * cfg.rollout.gpus_per_generator + cfg.learner.num_ranks * cfg.learner.gpus_per_rank
    )
    if gpus_min != gpus_used:
        problems.append(f"{gpus_min:g} GPUs at min size but the config uses {gpus_used:g}")
    return problems


CLUSTER_FILES = RAY_YAMLS + ["k8s/raycluster.yaml", "k8s/rayjob.yaml"]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_resources_match_the_7b_config(name: str) -> None:
    cfg = load_config("deepseekmath_7b")
    assert (cfg.rollout.num_generators, cfg.learner.num_ranks, cfg.reward.num_workers) == (8, 8, 8)
    assert capacity_problems(_node_types(name), cfg) == []


def test_capacity_check_flags_a_config_the_cluster_cannot_hold() -> None:
    cfg = load_config("deepseekmath_7b", ["rollout.num_generators=16", "learner.cpus_per_rank=64"])
    problems = capacity_problems(_node_types("aws-gpu.yaml"), cfg)
    assert any("'generator': 8 slots at min size, config asks 16" in p for p in problems), problems
    assert any("learner slots get 24.0 CPU < 64" in p for p in problems), problems
    assert any("GPUs at min size but the config uses 24" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------- the rest
@pytest.mark.parametrize("name", RAY_YAMLS)
def test_setup_installs_this_package_with_the_gpu_extra(name: str) -> None:
    config = _load(CLUSTER / name)
    assert config["file_mounts"]["~/dsmath"] == "."
    assert any('pip install' in c and '/dsmath[gpu]"' in c for c in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_dockerfile_installs_the_gpu_extra() -> None:
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and '[gpu]"' in text


def test_onprem_node_resources_helper_prints_each_role() -> None:
    config = _load(CLUSTER / "onprem.yaml")
    for ip, expected in config["metadata"]["dsmath_node_resources"].items():
        out = subprocess.run(
            [sys.executable, str(CLUSTER / "node_resources.py"), str(CLUSTER / "onprem.yaml"), "--ip", ip],
            capture_output=True, text=True, check=True,
        )
        assert json.loads(out.stdout) == expected
    out = subprocess.run(
        [sys.executable, str(CLUSTER / "node_resources.py"), str(CLUSTER / "onprem.yaml"), "--ip", "192.0.2.1"],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(out.stdout) == {}


def test_runtime_env_excludes_match_preflight_defaults() -> None:
    env = _load(CLUSTER / "runtime_env.yaml")
    assert tuple(env["excludes"]) == DEFAULT_EXCLUDES
    for must in (".git", ".venv", "/runs/", "/data/", "checkpoints/"):
        assert must in env["excludes"]


def test_job_scripts_parse() -> None:
    scripts = sorted((CLUSTER / "jobs").glob("*.sh"))
    assert {p.name for p in scripts} >= {"common.sh", "submit_7b.sh", "submit_tiny.sh", "local_cluster.sh"}
    for p in scripts:
        subprocess.run(["bash", "-n", str(p)], check=True)


def test_copied_crds_are_the_shared_ones() -> None:
    shared = Path("/work/shared/data/kuberay_crds")
    if not shared.exists():
        pytest.skip("shared data not mounted")
    for crd in K8S.values():
        assert (CLUSTER / "schemas" / crd).read_bytes() == (shared / crd).read_bytes()



# ---------------------------------------------------------------------------------------------- placement
def _nodes_at_max(name: str) -> list[dict]:
    """Every node the cluster file can have at its maximum worker counts, as resource dicts."""
    return [dict(t["resources"]) for t in _node_types(name) for _ in range(t["max"])]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_the_7b_placement_group_fits_the_cluster_at_its_maximum(name: str) -> None:
    """The bundles the driver asks for (role resources, GPUs, CPUs), the reward workers and the driver's
    entrypoint resources fit the node types the file declares."""
    from dsmath.placement import actor_bundles, fit_problem

    cfg = load_config("deepseekmath_7b")
    nodes = _nodes_at_max(name)
    bundles = actor_bundles(cfg, {"generator": 1, "learner": 1, "reward": 1})
    assert bundles[0] == {"CPU": 4.0, "GPU": 1.0, "generator": 1.0} and bundles[-1] == {
        "CPU": 4.0, "GPU": 1.0, "learner": 1.0}
    assert fit_problem(cfg, nodes, driver_resources={"driver": 1}) is None
    # ...and the check can fail: twice the generators do not fit.
    big = load_config("deepseekmath_7b", ["rollout.num_generators=64"])
    assert "do not fit" in fit_problem(big, nodes, driver_resources={"driver": 1})


def _local_head() -> dict:
    """The head `cluster/jobs/local_cluster.sh start` starts, with its default NUM_CPUS."""
    import re

    text = (CLUSTER / "jobs" / "local_cluster.sh").read_text()
    cpus = float(re.search(r'--num-cpus="\$\{NUM_CPUS:-(\d+)\}"', text).group(1))
    roles = json.loads(re.search(r"--resources='(\{[^']+\})'", text).group(1))
    return {"CPU": cpus, "GPU": 0.0, **{k: float(v) for k, v in roles.items()}}


def test_the_tiny_job_fits_the_local_cluster_head() -> None:
    from dsmath.placement import actor_bundles, fit_problem

    head = _local_head()
    cfg = load_config("tiny_cpu")
    assert actor_bundles(cfg, head) == [{"CPU": 1.0, "generator": 1.0}, {"CPU": 1.0, "learner": 1.0}]
    assert fit_problem(cfg, [head], driver_resources={"driver": 1}) is None
    # The 2-CPU head of before could hold the bundles but not also the reward worker.
    assert "not also the reward workers" in fit_problem(cfg, [{**head, "CPU": 2.0}], driver_resources={"driver": 1})


def test_bundles_carry_roles_only_on_clusters_that_have_them() -> None:
    from dsmath.placement import actor_bundles, loose_requests, role_options

    cfg = load_config("tiny_cpu", ["rollout.num_generators=2", "learner.num_ranks=2", "rollout.questions_per_step=16"])
    plain = {"CPU": 8.0}
    assert actor_bundles(cfg, plain) == [{"CPU": 1.0}] * 4
    assert role_options(plain) == {} and loose_requests(cfg, plain) == [{"CPU": 0.5}]
    roles = {"CPU": 8.0, "generator": 2.0, "learner": 2.0, "reward": 1.0}
    assert actor_bundles(cfg, roles) == [{"CPU": 1.0, "generator": 1.0}] * 2 + [{"CPU": 1.0, "learner": 1.0}] * 2
    assert role_options(roles)["generator"] == {"resources": {"generator": 1}}


def test_the_driver_never_repeats_a_variable_the_job_runtime_env_sets(monkeypatch) -> None:
    """Ray refuses ray.init(runtime_env) whose env_vars repeat a key of the job's runtime env (the bug of the
    documented submit recipe): the driver adds only the missing ones."""
    from wiring.cluster import worker_runtime_env

    job = _load(CLUSTER / "runtime_env.yaml")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    added = worker_runtime_env()["env_vars"]
    assert "HF_HUB_OFFLINE" in added and not set(added) & set(job["env_vars"])
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert worker_runtime_env()["env_vars"]["OMP_NUM_THREADS"] == "1"
    # The sandbox token reaches actors on other nodes (their processes do not descend from this driver).
    monkeypatch.delenv("DSMATH_SANDBOX_TOKEN", raising=False)
    assert "DSMATH_SANDBOX_TOKEN" not in worker_runtime_env().get("env_vars", {})
    monkeypatch.setenv("DSMATH_SANDBOX_TOKEN", "t" * 32)
    assert worker_runtime_env()["env_vars"]["DSMATH_SANDBOX_TOKEN"] == "t" * 32


def test_submit_7b_refuses_to_start_without_a_model_folder() -> None:
    """The 7B recipe used to default to a hub id, which the loader refuses on the cluster after the upload."""
    out = subprocess.run(["bash", str(CLUSTER / "jobs" / "submit_7b.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, timeout=30)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "MODEL_PATH" in out.stderr
