"""API keys on the router (serving/auth.py): the keys' sources and their constant-time check (pure), then a
real `kubellm router` process over echo replicas (real gRPC and HTTP over loopback): REST 401s in OpenAI's
shape and the official `openai` client with `api_key=`, gRPC UNAUTHENTICATED and `Client(api_key=)`,
health, metrics and reflection open, a kubelet-style rotation of the keys Secret taking effect in the same
process, and no key in the router's argv, logs or the replicas' metadata.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.serving import auth
from kubellm.runtime.serving.auth import ApiKeys, bearer_token, env_keys, key_id, parse_keys
from kubellm.runtime.serving.client import Client, ClientError
from processes import free_port, wait_serving

KEY_A = "sk-kubellm-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-kubellm-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
KEY_ENV = "sk-kubellm-from-the-environment-0123456789"


# --------------------------------------------------------------------------- the keys (pure)


@pytest.mark.parametrize("text, keys", [
    ("sk-1", ["sk-1"]),
    ("sk-1\n", ["sk-1"]),
    ("  sk-1  \r\n\n\tsk-2\n\n", ["sk-1", "sk-2"]),
    ("\n \n", []),
    ("", []),
])
def test_a_secret_file_holds_one_key_a_line(text, keys):
    assert parse_keys(text) == keys


@pytest.mark.parametrize("value, keys", [
    (None, []), ("", []), ("sk-1", ["sk-1"]), (" sk-1 , sk-2,,", ["sk-1", "sk-2"]),
])
def test_the_environment_gives_comma_separated_keys(value, keys):
    assert env_keys(value) == keys


@pytest.mark.parametrize("header, token", [
    ("Bearer sk-1", "sk-1"), ("bearer sk-1", "sk-1"), ("BEARER   sk-1 ", "sk-1"),
    (None, None), ("", None), ("Bearer", None), ("Bearer  ", None), ("Basic c2stMQ==", None), ("sk-1", None),
])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_key_id_is_short_stable_and_not_the_key():
    assert key_id(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:8] == key_id(KEY_A)
    assert key_id(KEY_A) != key_id(KEY_B) and len(key_id(KEY_A)) == 8 and key_id(KEY_A) not in KEY_A


def test_check_answers_the_key_id_or_none():
    keys = ApiKeys([KEY_A, KEY_B])
    assert keys.check(KEY_A) == key_id(KEY_A) and keys.check(KEY_B) == key_id(KEY_B)
    for wrong in (None, "", KEY_A[:-1], KEY_A + "x", KEY_A.upper(), "\ud800"):
        assert keys.check(wrong) is None
    assert keys.ids == [key_id(KEY_A), key_id(KEY_B)]
    assert ApiKeys([KEY_A, KEY_A]).ids == [key_id(KEY_A)]   # duplicates compared once


def test_check_compares_digests_against_every_key_without_an_early_exit(monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ApiKeys([KEY_A, KEY_B, KEY_ENV])
    for presented, expected in ((KEY_A, key_id(KEY_A)), (KEY_ENV, key_id(KEY_ENV)), ("short", None),
                                ("x" * 10_000, None)):
        calls.clear()
        assert keys.check(presented) == expected
        # Every key, the first one matching or none; fixed-length digests: neither which key nor its length shows.
        assert calls == [(32, 32)] * 3, (presented[:10], calls)


def test_no_source_means_auth_off_and_a_missing_directory_is_an_error(tmp_path):
    assert ApiKeys.from_sources(None, environ={}) is None
    assert ApiKeys.from_sources(None, environ={"KUBELLM_API_KEY": " , "}) is None
    env_only = ApiKeys.from_sources(None, environ={"KUBELLM_API_KEY": f"{KEY_A},{KEY_B}"})
    assert env_only.ids == [key_id(KEY_A), key_id(KEY_B)]
    with pytest.raises(ValueError, match=r"--api-keys-dir .*nope: no such directory \(mount the Secret"):
        ApiKeys.from_sources(tmp_path / "nope", environ={})


def kubelet_secret(directory: Path, files: dict[str, str], generation: int) -> None:
    """Write `files` into `directory` as kubelet projects a Secret: a timestamped directory, `..data` a
    link to it swapped atomically through `..data_tmp`, and each key a link through `..data`."""
    directory.mkdir(exist_ok=True)
    version = directory / f"..2026_01_01_00_00_{generation:02d}.000000001"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(version.name)
    os.replace(tmp, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for name in os.listdir(directory):   # keys the new version dropped
        if not name.startswith(".") and name not in files and (directory / name).is_symlink():
            (directory / name).unlink()
    for old in directory.glob("..2026_*"):
        if old != version:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def test_a_kubelet_rotation_is_read_within_the_reload_interval(tmp_path):
    secret = tmp_path / "keys"
    kubelet_secret(secret, {"api-key": KEY_A, "more": f"\n{KEY_ENV}\n"}, 1)
    (secret / ".hidden").write_text("sk-ignored")
    (secret / "subdir").mkdir()
    keys = ApiKeys(directory=secret, reload_interval=0.3)
    assert keys.check(KEY_A) and keys.check(KEY_ENV) and not keys.check("sk-ignored")

    kubelet_secret(secret, {"api-key": KEY_B}, 2)
    assert keys.check(KEY_A)   # not looked at again before the interval
    time.sleep(0.35)
    assert keys.check(KEY_A) is None and keys.check(KEY_ENV) is None   # removed keys stop working
    assert keys.check(KEY_B) == key_id(KEY_B)

    kubelet_secret(secret, {}, 3)   # an empty Secret: every request refused, not auth off
    time.sleep(0.35)
    assert keys.check(KEY_B) is None and keys.ids == []


def test_environment_keys_stay_beside_the_directory(tmp_path):
    secret = tmp_path / "keys"
    secret.mkdir()
    (secret / "k").write_text(KEY_A)
    keys = ApiKeys.from_sources(secret, environ={"KUBELLM_API_KEY": KEY_ENV})
    assert keys.check(KEY_A) and keys.check(KEY_ENV)
