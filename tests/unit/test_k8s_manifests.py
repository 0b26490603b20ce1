"""The Kubernetes manifests in k8s/: well-formed, complete, and in step with the code.

No cluster is needed: the checks read the YAML and the identity service's settings class. Each
check is a function that returns the problems it finds; the real manifests must have none, and a
copy broken on purpose must have at least one, so that no check can pass vacuously.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from membrane import cli, k8s_secrets
from services.identity.service import IdentitySettings
from shared import roles

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUSTOMIZATION = "kustomization.yaml"
OPTIONAL = "optional"
NAMESPACE = "membrane"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
# the datapath agent loads BPF programs and makes network namespaces: the one privileged workload
PRIVILEGED = frozenset({"DaemonSet/agent"})
CLUSTER_SCOPED = ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding")
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
IDENTITY = "identity"
IDENTITY_ENV = {
    "MEMBRANE_LOG_FORMAT": "json",
    "MEMBRANE_METRICS_HOST": "0.0.0.0",
    "MEMBRANE_METRICS_PORT": "9090",
}

Doc = dict[str, Any]


# --- loading ----------------------------------------------------------------------------------


def manifest_files(directory: Path) -> list[Path]:
    """The manifests `kubectl apply -k` installs: not those under optional/ (applied by hand
    where their CRDs exist, tests/unit/test_k8s_optional.py)."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in (".yaml", ".yml")
        and p.name != KUSTOMIZATION
        and p.is_file()
        and OPTIONAL not in p.relative_to(directory).parts
    )


def load_docs(directory: Path) -> list[Doc]:
    docs: list[Doc] = []
    for path in manifest_files(directory):
        with path.open() as f:
            docs.extend(doc for doc in yaml.safe_load_all(f) if doc is not None)
    return docs


def load_kustomization(directory: Path) -> Doc:
    with (directory / KUSTOMIZATION).open() as f:
        loaded: Doc = yaml.safe_load(f)
    return loaded


def name_of(doc: Doc) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d.get("kind") in WORKLOAD_KINDS]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels") or {}
    return labels


def containers(workload: Doc) -> Iterator[Doc]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers") or []
    yield from spec["containers"]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container_named(workload: Doc, name: str) -> Doc:
    matches = [c for c in containers(workload) if c["name"] == name]
    assert len(matches) == 1, f"{name_of(workload)} has {len(matches)} containers named {name}"
    return matches[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a non-empty equality selector matches a set of labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- checks: each returns the problems it finds -----------------------------------------------


def kustomization_problems(kustomization: Doc, directory: Path) -> list[str]:
    listed = kustomization.get("resources") or []
    problems = [
        f"{r} is listed in {KUSTOMIZATION} but missing"
        for r in listed
        if not (directory / r).is_file()
    ]
    listed_paths = {(directory / r).resolve() for r in listed}
    problems += [
        f"{p.relative_to(directory)} is not listed in {KUSTOMIZATION}"
        for p in manifest_files(directory)
        if p.resolve() not in listed_paths
    ]
    return problems


def metadata_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        metadata = doc.get("metadata") or {}
        for field, value in (
            ("apiVersion", doc.get("apiVersion")),
            ("kind", doc.get("kind")),
            ("metadata.name", metadata.get("name")),
        ):
            if not isinstance(value, str) or not value:
                problems.append(f"{name_of(doc)} has no {field}")
        namespace = metadata.get("namespace")
        if doc.get("kind") in CLUSTER_SCOPED:
            if namespace is not None:
                problems.append(f"{name_of(doc)} is cluster-scoped but has a namespace")
        elif namespace != NAMESPACE:
            problems.append(f"{name_of(doc)} is in namespace {namespace!r}, not {NAMESPACE!r}")
    if not any(
        d.get("kind") == "Namespace" and (d.get("metadata") or {}).get("name") == NAMESPACE
        for d in docs
    ):
        problems.append(f"no Namespace {NAMESPACE} is defined")
    return problems


def workload_selector_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for workload in workloads(docs):
        selector = workload["spec"].get("selector") or {}
        if set(selector) - {"matchLabels"}:
            problems.append(f"{name_of(workload)}: only matchLabels selectors are checked")
        if not selects(selector.get("matchLabels") or {}, pod_labels(workload)):
            problems.append(f"{name_of(workload)}: selector does not match its pod labels")
    return problems


def service_problems(docs: list[Doc]) -> list[str]:
    """Every Service selects the pods of some workload, and names only ports those pods have."""
    problems = []
    for service in (d for d in docs if d.get("kind") == "Service"):
        selector = service["spec"].get("selector") or {}
        selected = [
            w
            for w in workloads(docs)
            if w["metadata"].get("namespace") == service["metadata"].get("namespace")
            and selects(selector, pod_labels(w))
        ]
        if not selected:
            problems.append(f"{name_of(service)}: selector {selector} matches no workload's pods")
            continue
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for workload in selected:
                if not any(has_port(c, target) for c in containers(workload)):
                    problems.append(
                        f"{name_of(service)}: targetPort {target!r} is not a container port "
                        f"of {name_of(workload)}"
                    )
    return problems


def disruption_budget_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for pdb in (d for d in docs if d.get("kind") == "PodDisruptionBudget"):
        selector = (pdb["spec"].get("selector") or {}).get("matchLabels") or {}
        if not any(selects(selector, pod_labels(w)) for w in workloads(docs)):
            problems.append(f"{name_of(pdb)}: selector {selector} matches no workload's pods")
    return problems


def has_port(container: Doc, port: int | str) -> bool:
    ports = container.get("ports") or []
    if isinstance(port, int):
        return any(p.get("containerPort") == port for p in ports)
    return any(p.get("name") == port for p in ports)


def probe_port_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for workload in workloads(docs):
        for container in containers(workload):
            for probe_name in PROBES:
                probe = container.get(probe_name) or {}
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler not in probe:
                        continue
                    port = probe[handler]["port"]
                    if not has_port(container, port):
                        problems.append(
                            f"{name_of(workload)} container {container['name']}: "
                            f"{probe_name} uses port {port!r}, which the container does not have"
                        )
    return problems


def secret_references(docs: list[Doc]) -> Iterator[tuple[str, str, str | None]]:
    """(where, secret name, key or None for the whole Secret) for every reference."""
    for workload in workloads(docs):
        for container in containers(workload):
            where = f"{name_of(workload)} container {container['name']}"
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref is not None:
                    yield where, ref["name"], ref["key"]
            for env_from in container.get("envFrom") or []:
                if "secretRef" in env_from:
                    yield where, env_from["secretRef"]["name"], None
        for volume in pod_spec(workload).get("volumes") or []:
            if "secret" in volume:
                yield name_of(workload), volume["secret"]["secretName"], None


def secret_problems(docs: list[Doc], generated: list[Doc]) -> list[str]:
    """Every Secret a workload uses is one ``membrane k8s secrets`` makes, with that key."""
    secrets = {d["metadata"]["name"]: d["stringData"] for d in generated}
    problems = []
    for where, name, key in secret_references(docs):
        if name not in secrets:
            problems.append(
                f"{where} uses Secret {name}, which `membrane k8s secrets` does not make"
            )
        elif key is not None and key not in secrets[name]:
            problems.append(f"{where} uses key {key!r} of Secret {name}, which has no such key")
    return problems


def committed_secret_problems(docs: list[Doc]) -> list[str]:
    """No password, key or certificate is in git: k8s/ holds no Secret."""
    return [f"{name_of(d)} is committed" for d in docs if d.get("kind") == "Secret"]


def bus_user_problems(docs: list[Doc]) -> list[str]:
    """Each membrane workload reaches NATS as its own role's user, over TLS verified with the
    mounted membrane-ca, and Redis (where it uses it) over TLS too."""
    problems = []
    for workload in workloads(docs):
        for container in containers(workload):
            env = {e["name"]: e for e in container.get("env") or []}
            if "MEMBRANE_NATS_URL" not in env:
                continue
            where = f"{name_of(workload)} container {container['name']}"
            role = roles.role_of_service(container["args"][1])
            url = env["MEMBRANE_NATS_URL"]["value"]
            if not re.fullmatch(
                rf"tls://{role}:\$\(NATS_PASSWORD\)@[a-z.]+:4222\?ca={k8s_secrets.CA_FILE}", url
            ):
                problems.append(f"{where}: NATS URL {url!r} is not tls:// as user {role}")
            ref = (env.get("NATS_PASSWORD", {}).get("valueFrom") or {}).get("secretKeyRef", {})
            if ref != {"name": "nats-auth", "key": role}:
                problems.append(f"{where}: NATS_PASSWORD is not nats-auth's key {role}")
            redis = env.get("MEMBRANE_REDIS_URL", {}).get(
                "value", f"rediss://{k8s_secrets.CA_FILE}"
            )
            if not redis.startswith("rediss://") or k8s_secrets.CA_FILE not in redis:
                problems.append(f"{where}: Redis URL {redis!r} is not rediss:// with the CA")
            mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
            volumes = {v["name"]: v for v in pod_spec(workload).get("volumes") or []}
            ca = volumes.get("membrane-ca", {}).get("secret", {}).get("secretName")
            if mounts.get("membrane-ca") != str(Path(k8s_secrets.CA_FILE).parent) or ca != (
                "membrane-ca"
            ):
                problems.append(f"{where}: the membrane-ca Secret is not mounted")
    return problems


def env_problems(docs: list[Doc]) -> list[str]:
    """Env values are strings, and $(VAR) only names a variable defined earlier in the list."""
    problems = []
    for workload in workloads(docs):
        for container in containers(workload):
            defined: set[str] = set()
            for env in container.get("env") or []:
                where = f"{name_of(workload)} container {container['name']} env {env['name']}"
                if "value" in env:
                    value = env["value"]
                    if not isinstance(value, str):
                        problems.append(f"{where}: value {value!r} is not a string (quote it)")
                    else:
                        for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                            if var not in defined:
                                problems.append(f"{where}: $({var}) is not defined before it")
                defined.add(env["name"])
    return problems


def security_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for workload in workloads(docs):
        if name_of(workload) in PRIVILEGED:
            continue  # checked for what it needs in test_k8s_deploy.py
        pod_context = pod_spec(workload).get("securityContext") or {}
        for container in containers(workload):
            where = f"{name_of(workload)} container {container['name']}"
            context = container.get("securityContext") or {}
            if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not set")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: the root filesystem is writable")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation is allowed")
            if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities are not all dropped")
            if not (container.get("resources") or {}).get("limits"):
                problems.append(f"{where}: no resource limits")
            if not (container.get("resources") or {}).get("requests"):
                problems.append(f"{where}: no resource requests")
    return problems


def settings_env_problems(container: Doc, settings: type[Any]) -> list[str]:
    """Every MEMBRANE_* variable is a field of ``settings``: MEMBRANE_ + the field upper-cased."""
    known = {"MEMBRANE_" + f.name.upper() for f in dataclasses.fields(settings)}
    return [
        f"{env['name']} is set but {settings.__name__} has no such setting"
        for env in container.get("env") or []
        if env["name"].startswith("MEMBRANE_") and env["name"] not in known
    ]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return load_docs(K8S)


@pytest.fixture
def broken(docs: list[Doc]) -> list[Doc]:
    """A copy of the manifests for a test to break."""
    return copy.deepcopy(docs)


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    target = tmp_path / "k8s"
    target.mkdir()
    for path in [K8S / KUSTOMIZATION, *manifest_files(K8S)]:
        (target / path.relative_to(K8S)).parent.mkdir(parents=True, exist_ok=True)
        (target / path.relative_to(K8S)).write_text(path.read_text())
    return target


def identity_container(docs: list[Doc]) -> Doc:
    return container_named(find(docs, "Deployment", IDENTITY), IDENTITY)


def env_of(container: Doc) -> dict[str, Doc]:
    return {env["name"]: env for env in container.get("env") or []}


# --- the manifests ----------------------------------------------------------------------------


def test_manifests_parse_and_cover_every_part(docs: list[Doc]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Namespace", NAMESPACE) in kinds
    assert ("StatefulSet", "nats") in kinds
    assert ("StatefulSet", "redis") in kinds
    assert ("Deployment", IDENTITY) in kinds


def test_kustomization_lists_exactly_the_manifests() -> None:
    assert kustomization_problems(load_kustomization(K8S), K8S) == []


def test_kustomization_catches_a_missing_and_an_unlisted_file(k8s_copy: Path) -> None:
    kustomization = load_kustomization(k8s_copy)
    (k8s_copy / "extra.yaml").write_text("kind: ConfigMap\n")
    kustomization["resources"].append("gone.yaml")
    problems = kustomization_problems(kustomization, k8s_copy)
    assert any("gone.yaml is listed" in p for p in problems)
    assert any("extra.yaml is not listed" in p for p in problems)


def test_every_document_has_identity_and_namespace(docs: list[Doc], generated: list[Doc]) -> None:
    assert metadata_problems([*docs, *generated]) == []


def test_metadata_check_catches_a_missing_name_and_a_wrong_namespace(
    broken: list[Doc], generated: list[Doc]
) -> None:
    broken += copy.deepcopy(generated)
    find(broken, "Secret", "redis-auth")["metadata"]["namespace"] = "default"
    del find(broken, "ConfigMap", "nats-config")["apiVersion"]
    del find(broken, "Service", "redis")["metadata"]["name"]
    find(broken, "Namespace", NAMESPACE)["metadata"]["name"] = "membrane-system"
    assert sorted(metadata_problems(broken)) == [
        "ConfigMap/nats-config has no apiVersion",
        "Secret/redis-auth is in namespace 'default', not 'membrane'",
        "Service/None has no metadata.name",
        "no Namespace membrane is defined",
    ]


def test_workload_selectors_match_their_pod_labels(docs: list[Doc]) -> None:
    assert workloads(docs)
    assert workload_selector_problems(docs) == []


def test_workload_selector_check_catches_a_mismatch(broken: list[Doc]) -> None:
    workload = find(broken, "StatefulSet", "redis")
    workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "other"
    assert workload_selector_problems(broken) == [
        "StatefulSet/redis: selector does not match its pod labels"
    ]


def test_services_select_workload_pods_and_their_ports(docs: list[Doc]) -> None:
    assert any(d["kind"] == "Service" for d in docs)
    assert service_problems(docs) == []


def test_service_check_catches_a_stray_selector_and_port(broken: list[Doc]) -> None:
    find(broken, "Service", "redis")["spec"]["selector"] = {"app.kubernetes.io/name": "rediss"}
    find(broken, "Service", "nats")["spec"]["ports"][0]["targetPort"] = "clients"
    problems = service_problems(broken)
    assert any(p.startswith("Service/redis: selector") for p in problems)
    assert any(p.startswith("Service/nats: targetPort 'clients'") for p in problems)


def test_disruption_budgets_select_workload_pods(docs: list[Doc]) -> None:
    assert disruption_budget_problems(docs) == []
    pdb = find(docs, "PodDisruptionBudget", IDENTITY)
    assert selects(
        pdb["spec"]["selector"]["matchLabels"], pod_labels(find(docs, "Deployment", IDENTITY))
    )


def test_disruption_budget_check_catches_a_stray_selector(broken: list[Doc]) -> None:
    pdb = find(broken, "PodDisruptionBudget", IDENTITY)
    pdb["spec"]["selector"]["matchLabels"] = {"app": "nothing"}
    assert len(disruption_budget_problems(broken)) == 1


def test_probes_use_ports_the_containers_have(docs: list[Doc]) -> None:
    assert probe_port_problems(docs) == []


def test_probe_check_catches_a_named_and_a_numbered_port(broken: list[Doc]) -> None:
    identity = identity_container(broken)
    identity["readinessProbe"]["httpGet"]["port"] = "metric"
    identity["livenessProbe"]["httpGet"]["port"] = 9091
    problems = probe_port_problems(broken)
    assert any("readinessProbe uses port 'metric'" in p for p in problems)
    assert any("livenessProbe uses port 9091" in p for p in problems)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    return k8s_secrets.generate(tmp_path_factory.mktemp("k8s") / "ca")


def test_referenced_secrets_and_keys_are_generated(docs: list[Doc], generated: list[Doc]) -> None:
    assert list(secret_references(docs))
    assert secret_problems(docs, generated) == []


def test_secret_check_catches_an_unknown_secret_and_key(
    broken: list[Doc], generated: list[Doc]
) -> None:
    env = env_of(identity_container(broken))
    env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] = "nats-credentials"
    env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] = "pass"
    problems = secret_problems(broken, generated)
    assert any("Secret nats-credentials" in p for p in problems)
    assert any("key 'pass' of Secret redis-auth" in p for p in problems)


def test_no_secret_is_committed(docs: list[Doc], generated: list[Doc]) -> None:
    assert committed_secret_problems(docs) == []
    assert committed_secret_problems([*docs, generated[0]]) == ["Secret/nats-auth is committed"]


def test_every_workload_is_its_own_role_over_tls(docs: list[Doc]) -> None:
    assert bus_user_problems(docs) == []


def test_bus_user_check_catches_admin_plain_text_and_a_missing_ca(broken: list[Doc]) -> None:
    container = identity_container(broken)
    env = env_of(container)
    env["MEMBRANE_NATS_URL"]["value"] = "tls://admin:$(NATS_PASSWORD)@nats:4222"
    env["MEMBRANE_REDIS_URL"]["value"] = "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "membrane-ca"]
    problems = bus_user_problems(broken)
    assert len(problems) == 3, problems


def test_nats_users_are_the_roles_of_shared_roles(docs: list[Doc]) -> None:
    """k8s/nats.yaml's users and permissions are what shared/roles.py says (regenerate the block
    with `python -m membrane.k8s_secrets` after changing a role)."""
    config = find(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
    assert config.count(k8s_secrets.nats_authorization() + "\n") == 1


def test_nats_gets_every_users_password(docs: list[Doc]) -> None:
    env = env_of(container_named(find(docs, "StatefulSet", "nats"), "nats"))
    for user in (*k8s_secrets.USERS, k8s_secrets.ROUTES_USER):
        ref = env[k8s_secrets.password_env(user)]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "nats-auth", "key": user}


def test_env_values_are_strings_and_interpolate_earlier_variables(docs: list[Doc]) -> None:
    assert env_problems(docs) == []


def test_env_check_catches_a_number_and_a_late_variable(broken: list[Doc]) -> None:
    container = identity_container(broken)
    env_of(container)["MEMBRANE_METRICS_PORT"]["value"] = 9090
    container["env"] = [e for e in container["env"] if e["name"] != "NATS_PASSWORD"] + [
        e for e in container["env"] if e["name"] == "NATS_PASSWORD"
    ]
    problems = env_problems(broken)
    assert any("MEMBRANE_METRICS_PORT: value 9090 is not a string" in p for p in problems)
    assert any("MEMBRANE_NATS_URL: $(NATS_PASSWORD) is not defined" in p for p in problems)


def test_containers_are_locked_down_and_bounded(docs: list[Doc]) -> None:
    assert security_problems(docs) == []


def test_security_check_catches_a_loosened_container(broken: list[Doc]) -> None:
    container = identity_container(broken)
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["securityContext"]["capabilities"]["drop"] = ["NET_RAW"]
    del container["resources"]["limits"]
    problems = security_problems(broken)
    assert any("root filesystem is writable" in p for p in problems)
    assert any("capabilities are not all dropped" in p for p in problems)
    assert any("no resource limits" in p for p in problems)


# --- the identity service ---------------------------------------------------------------------


def test_identity_env_names_are_identity_settings(docs: list[Doc]) -> None:
    container = identity_container(docs)
    assert any(name.startswith("MEMBRANE_") for name in env_of(container))
    assert settings_env_problems(container, IdentitySettings) == []


def test_identity_env_check_catches_a_renamed_setting(docs: list[Doc]) -> None:
    renamed = dataclasses.make_dataclass(
        "Renamed",
        [
            ("metrics_listen_port" if f.name == "metrics_port" else f.name, f.type)
            for f in dataclasses.fields(IdentitySettings)
        ],
    )
    assert settings_env_problems(identity_container(docs), renamed) == [
        "MEMBRANE_METRICS_PORT is set but Renamed has no such setting"
    ]


def test_identity_reaches_nats_and_redis_with_the_secrets(docs: list[Doc]) -> None:
    env = env_of(identity_container(docs))
    nats_url = env["MEMBRANE_NATS_URL"]["value"]
    redis_url = env["MEMBRANE_REDIS_URL"]["value"]
    assert nats_url.startswith("tls://identity:$(NATS_PASSWORD)@nats")
    assert redis_url.startswith("rediss://:$(REDIS_PASSWORD)@redis")
    for name in ("MEMBRANE_NATS_URL", "MEMBRANE_REDIS_URL"):
        assert "valueFrom" not in env[name]
    for name, value in IDENTITY_ENV.items():
        assert env[name].get("value") == value, name


def test_identity_runs_the_identity_service(docs: list[Doc]) -> None:
    container = identity_container(docs)
    assert container["args"] == ["run", "identity"]
    assert "command" not in container, "the image's entrypoint is `membrane`"
    args = cli.build_parser().parse_args(container["args"])
    assert args.func is cli.cmd_run
    assert args.service == IDENTITY


def test_identity_metrics_port_is_probed_and_scraped(docs: list[Doc]) -> None:
    deployment = find(docs, "Deployment", IDENTITY)
    container = identity_container(docs)
    port = int(env_of(container)["MEMBRANE_METRICS_PORT"]["value"])
    assert has_port(container, port)
    port_names = {p["name"] for p in container["ports"] if p["containerPort"] == port}
    for probe_name in ("livenessProbe", "readinessProbe"):
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == "/metrics", probe_name
        assert probe["port"] in {port, *port_names}, probe_name
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)


def test_identity_scales_out_and_survives_disruption(docs: list[Doc]) -> None:
    deployment = find(docs, "Deployment", IDENTITY)
    assert deployment["spec"]["replicas"] >= 2
    account = pod_spec(deployment)["serviceAccountName"]
    assert find(docs, "ServiceAccount", account)["metadata"]["name"] == account
