"""docs/seeds.md lists every option of the seeds' APIs that the code decides on, with the same decision
(mapped / accepted / refused) and, for LMDeploy's configs, the same classes."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from kubellm.runtime.chat_template import ChatTemplateConfig
from kubellm.runtime.lmdeploy_compat import FIELDS, PytorchEngineConfig, TurbomindEngineConfig
from kubellm.runtime.mii_compat import GENERATE_PARAMS, MII_CONFIG, MODEL_CONFIG

DOC = (Path(__file__).resolve().parents[2] / "docs" / "seeds.md").read_text()


def rows(heading: str) -> dict[str, list[str]]:
    """The table under `heading`: each name of a row's first cell -> the row's other cells."""
    section = DOC.split(heading, 1)[1].split("\n#", 1)[0]
    out = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`([^`]+)`", cells[0]):
            out[name] = cells[1:]
    return out


def decision(text: str) -> str:
    return re.match(r"\w+", text).group(0)


def test_lmdeploy_configs_table():
    table = rows("### `TurbomindEngineConfig` and `PytorchEngineConfig`")
    assert set(table) == set(FIELDS)
    for name, (turbomind, pytorch, here) in table.items():
        assert (turbomind == "✓") == (name in TurbomindEngineConfig.model_fields), name
        assert (pytorch == "✓") == (name in PytorchEngineConfig.model_fields), name
        assert decision(here) == decision(FIELDS[name]), (name, here, FIELDS[name])


@pytest.mark.parametrize("heading, table", [("### `ModelConfig`", MODEL_CONFIG), ("### `MIIConfig`", MII_CONFIG),
                                            ("### `GenerateParamsConfig`", GENERATE_PARAMS)])
def test_mii_tables(heading, table):
    documented = rows(heading)
    assert set(documented) == set(table)
    for name, (here,) in documented.items():
        assert decision(here) == decision(table[name]), (name, here, table[name])


def test_chat_template_config_table():
    assert set(rows("### `ChatTemplateConfig`")) == {f.name for f in fields(ChatTemplateConfig)}
