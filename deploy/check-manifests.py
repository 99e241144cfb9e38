#!/usr/bin/env python3
"""What a schema cannot see in deploy/k8s: the manifests against each other and against the
installer, and the admission policy's CEL run on sample pods (cel-python evaluates the same
expressions the API server does). Run by deploy/check.sh in its venv; exits 1 naming each
failed check.

Usage: check-manifests.py K8S_DIR INSTALLER_SCRIPT
"""
import pathlib
import re
import sys

import celpy
import yaml

MODES = {"kuasar-vmm", "kuasar-vmm-shim", "kuasar-vmm-zero"}
FAILED = []


def check(ok, what):
    if not ok:
        FAILED.append(what)


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    check(len(found) == 1, f"expected one {kind}, found {len(found)}")
    return found[0] if found else {}


def refusal(policy, pod):
    """The message the policy denies POD with, or None when it admits it."""
    env = celpy.Environment()
    activation = {"object": celpy.json_to_cel(pod)}

    def holds(expression):
        return bool(env.program(env.compile(expression)).evaluate(activation))

    spec = policy["spec"]
    if not all(holds(c["expression"]) for c in spec.get("matchConditions", [])):
        return None
    return next((v["message"] for v in spec["validations"] if not holds(v["expression"])), None)


def check_runtime_classes(docs, label):
    classes = [d for d in docs if d["kind"] == "RuntimeClass"]
    check({c["metadata"]["name"] for c in classes} == MODES, f"RuntimeClasses are not {sorted(MODES)}")
    for c in classes:
        name = c["metadata"]["name"]
        check(c.get("handler") == name, f"RuntimeClass {name}: handler is not {name}")
        fixed = c.get("overhead", {}).get("podFixed", {})
        check({"memory", "cpu"} <= fixed.keys(), f"RuntimeClass {name}: no memory and cpu overhead")
        selector = c.get("scheduling", {}).get("nodeSelector")
        check(selector == {label: "true"}, f"RuntimeClass {name}: nodeSelector is not the installer's {label}")


def check_policy(docs):
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    check(binding["spec"]["policyName"] == policy["metadata"]["name"], "the binding names another policy")
    check("Deny" in binding["spec"]["validationActions"], "the binding does not deny")
    for mode in sorted(MODES):
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            message = refusal(policy, {"spec": {"runtimeClassName": mode, field: True}})
            check(message is not None and field in message, f"{mode} pod with {field}: not refused naming it")
            check(refusal(policy, {"spec": {"runtimeClassName": mode, field: False}}) is None,
                  f"{mode} pod with {field}: false refused")
        check(refusal(policy, {"spec": {"runtimeClassName": mode}}) is None, f"plain {mode} pod refused")
    for pod in ({"spec": {"runtimeClassName": "runc", "hostNetwork": True}}, {"spec": {"hostNetwork": True}}):
        check(refusal(policy, pod) is None, f"a pod outside kuasar-vmm refused: {pod}")


def check_installer(docs):
    account = one(docs, "ServiceAccount")["metadata"]
    daemonset = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    binding = one(docs, "ClusterRoleBinding")
    role = one(docs, "ClusterRole")
    check(daemonset["serviceAccountName"] == account["name"], "the DaemonSet runs as another account")
    check({"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
          in binding["subjects"], "the ClusterRoleBinding does not bind the installer's account")
    check(binding["roleRef"]["name"] == role["metadata"]["name"], "the ClusterRoleBinding names another role")
    check(any("nodes" in r["resources"] and {"get", "patch"} <= set(r["verbs"]) for r in role["rules"]),
          "the ClusterRole cannot label nodes")
    install = one([dict(c, kind=c["name"]) for c in daemonset["initContainers"]], "install")
    env = {e["name"]: e for e in install.get("env", [])}
    check(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
          "the installer gets no NODE_NAME")
    mounts = {m["mountPath"] for m in install.get("volumeMounts", [])}
    check(env.get("KUASAR_ROOT", {}).get("value") in mounts, "KUASAR_ROOT is not where the node's / is mounted")
    if env.get("KUASAR_RESTART", {}).get("value") == "1":
        check(daemonset.get("hostPID") is True, "KUASAR_RESTART=1 needs hostPID (nsenter into PID 1)")


def main(k8s_dir, installer):
    docs = []
    for path in sorted(pathlib.Path(k8s_dir).glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    label = re.search(r"^NODE_LABEL=(\S+)$", pathlib.Path(installer).read_text(), re.M).group(1)
    for name, run in (("RuntimeClasses", lambda: check_runtime_classes(docs, label)),
                      ("admission policy", lambda: check_policy(docs)),
                      ("installer", lambda: check_installer(docs))):
        try:
            run()
        except (KeyError, TypeError) as e:
            FAILED.append(f"{name}: no field {e}")
    for what in FAILED:
        print(f"check-manifests: FAIL: {what}", file=sys.stderr)
    if not FAILED:
        print(f"check-manifests: {len(docs)} objects consistent, policy refuses and admits as meant", file=sys.stderr)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
