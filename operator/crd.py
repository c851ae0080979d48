"""The `LLMDeployment` CustomResourceDefinition, generated from the pydantic types in `api/spec.py`.

    python -m kubellm.operator.crd            # print the CRD as YAML
    python -m kubellm.operator.crd --write    # write crds/ and the Helm chart's copy
    python -m kubellm.operator.crd --check    # exit 1 when either file is out of date

The schema is `structural.to_structural` of the types (how, and why, is written there).

`spec.CEL_RULES` go to `x-kubernetes-validations` on `.spec`, each with the `fieldPath` of the
field it names, so the API server's error names that field.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml

from kubellm.api import spec as spec_types
from kubellm.operator.structural import ordered, structural_problems, to_structural

CRD_NAME = f"{spec_types.PLURAL}.{spec_types.GROUP}"
CRD_FILE = f"{CRD_NAME}.yaml"
# Children are named NAME-g<index> (StatefulSet + headless Service), NAME-router, NAME-leaders,
# NAME-config, and a Service called NAME: a DNS-1035 label, short enough that a StatefulSet's
# pod names and controller-revision-hash label stay within 63 characters.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 47
REGENERATE = "python -m kubellm.operator.crd --write"
HEADER = (f"# Generated from api/spec.py by `{REGENERATE}`. Do not edit by hand.\n")

# -- the CRD -----------------------------------------------------------------------------------
def spec_schema() -> dict:
    schema = to_structural(spec_types.LLMDeploymentSpec.model_json_schema(), path=".spec")
    schema["description"] = "Desired state: the model, its parallel layout, replicas, engine and serving options."
    validations = []
    for rule in spec_types.CEL_RULES:
        entry = {"rule": rule.cel, "message": rule.message}
        if rule.field.startswith("spec.") and rule.field != "spec.":
            entry["fieldPath"] = rule.field[len("spec"):]
        if rule.transition:
            entry["optionalOldSelf"] = True
        validations.append(entry)
    schema["x-kubernetes-validations"] = validations
    return ordered(schema)


def status_schema() -> dict:
    schema = to_structural(spec_types.LLMDeploymentStatus.model_json_schema(), path=".status")
    schema["description"] = "Observed state, written by the operator."
    conditions = schema["properties"].get("conditions")
    if conditions is not None:  # metav1.Condition semantics: one entry per type
        conditions["x-kubernetes-list-type"] = "map"
        conditions["x-kubernetes-list-map-keys"] = ["type"]
        schema["properties"]["conditions"] = ordered(conditions)
    return ordered(schema)


def object_validations() -> list[dict]:
    """spec.OBJECT_RULES: at the root, where CEL may read metadata.name (only name and generateName are there)."""
    return [{"rule": rule.cel, "message": rule.message, "fieldPath": "." + rule.field}
            for rule in spec_types.OBJECT_RULES]


def openapi_schema() -> dict:
    return {
        "description": f"{spec_types.KIND} serves one language model: tensor x pipeline parallel groups "
                       "of worker pods behind a router, optionally with a REST API and an Ingress.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion defines the versioned schema of this object."},
            "kind": {"type": "string", "description": "Kind is the REST resource this object represents."},
            "metadata": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": NAME_MAX_LENGTH, "pattern": NAME_PATTERN}}},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": object_validations(),
    }


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "description": "where the weights come from"},
    {"name": "TP", "type": "integer", "jsonPath": ".spec.tensorParallel", "description": "tensor parallel size"},
    {"name": "PP", "type": "integer", "jsonPath": ".spec.pipelineParallel", "description": "pipeline parallel size"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready", "description": "replica groups serving / desired"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "description": "in-cluster gRPC address"},
    # -o wide only: how long the model took to load, the figure a slow start is judged by.
    {"name": "Load-Seconds", "type": "number", "jsonPath": ".status.lastLoadSeconds", "priority": 1,
     "description": "the last ready replica group's model load, from its worker's start to Ready"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) for LLMDeployment."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "kubellm",
                                                  "app.kubernetes.io/component": "crd"}},
        "spec": {
            "group": spec_types.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": spec_types.KIND,
                "listKind": f"{spec_types.KIND}List",
                "plural": spec_types.PLURAL,
                "singular": spec_types.SINGULAR,
                "shortNames": list(spec_types.SHORT_NAMES),
                "categories": ["kubellm"],
            },
            "versions": [{
                "name": spec_types.VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": openapi_schema()},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def render(manifest: dict | None = None) -> str:
    body = yaml.safe_dump(crd_manifest() if manifest is None else manifest, sort_keys=False,
                          default_flow_style=False, allow_unicode=True, width=100_000)
    return HEADER + "---\n" + body


# -- command line ------------------------------------------------------------------------------
def repo_root() -> Path:
    """The checkout this module lives in (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "crds").is_dir() else Path.cwd()


def output_paths(root: Path) -> list[Path]:
    # The chart keeps its copy out of crds/ (which `helm upgrade` never updates): templates/crd.yaml
    # renders it, so upgrades apply it too.
    return [root / "crds" / CRD_FILE, root / "charts" / "kubellm" / "files" / CRD_FILE]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubellm.operator.crd", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write crds/ and the Helm chart's copy")
    mode.add_argument("--check", action="store_true", help="exit 1 when a written copy is out of date")
    parser.add_argument("--root", type=Path, default=None, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)

    manifest = crd_manifest()
    problems = structural_problems(manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    if problems:
        print("the generated schema is not structural:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    text = render(manifest)
    if not (args.write or args.check):
        sys.stdout.write(text)
        return 0

    root = args.root or repo_root()
    stale = 0
    for path in output_paths(root):
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current == text:
            continue
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(root)}")
            continue
        stale += 1
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), f"{path.relative_to(root)} (committed)",
                                         f"{path.relative_to(root)} (generated)", lineterm="", n=1))
        print(f"{path.relative_to(root)} is out of date with api/spec.py"
              + ("" if path.exists() else " (missing)") + ":", file=sys.stderr)
        print("\n".join(diff[:40]) + ("\n..." if len(diff) > 40 else ""), file=sys.stderr)
    if stale:
        print(f"run: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
