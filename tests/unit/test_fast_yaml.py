"""The line-by-line reader of plain block YAML gives what PyYAML gives, or declines."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import yaml

from shared import fast_yaml, gcpause, kube_yaml


def pyyaml(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=kube_yaml._Loader))


def fast(text: str) -> list[Any] | None:
    return fast_yaml.load_all(text, kube_yaml._Loader(""))


SAME = [
    "",
    "# only a comment\n",
    "---\n",
    "---\n---\n",
    "a: 1\n---\n",
    "a: 1\n---\nb: 2\n",
    "---\na: 1\n",
    "a:\n",
    "a:\nb: 2\n",
    "a: 1\nb: yes\nc: no\nd: ~\ne: null\nf: 1.5\ng: 0x1F\nh: 010\ni: 1_000\nj: .inf\nk: on\n",
    "a: 2001-12-14\nb: 1:20\nc: 10.0.0.1\nd: nginx:1.25\ne: http://x/y\n",
    "80: http\ntrue: x\n",
    "s: 'quoted: text'\nd: \"double # not a comment\"\ne: ''\nf: \"\"\n",
    "a: {}\nb: []\n",
    "spec:\n  ports:\n  - name: http\n    port: 80\n  - name: https\n    port: 443\n",
    "spec:\n  ports:\n    - name: http\n      port: 80\n",
    "list:\n- a\n- b\nnext: 1\n",
    "- a\n- b: 1\n  c: 2\n-\n- - x\n  - y\n",
    "-\n  a: 1\n- 2\n",
    "a:\n  b:\n    c:\n      d: deep\n  e: 1\nf: 2\n",
    "a:   spaced  \nb: 1   \n",
    "  # indented comment\na: 1\n\n\nb: 2\n",
    "key with spaces: value with spaces\n",
    "a: -1\n",
]


@pytest.mark.parametrize("text", SAME)
def test_same_as_pyyaml(text: str) -> None:
    got = fast(text)
    if got is not None:  # declining is always allowed; a different answer never
        assert got == pyyaml(text)


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\nb: 2\n",
        "spec:\n  ports:\n  - name: http\n    port: 80\n",
        "---\nkind: Service\n---\nkind: EndpointSlice\n",
        "a: 10.0.0.1\nb: yes\n",
    ],
)
def test_reads_plain_block_yaml_itself(text: str) -> None:
    assert fast(text) == pyyaml(text)


@pytest.mark.parametrize(
    "text",
    [
        "a: &x 1\nb: *x\n",  # anchors and aliases
        "a: !!str 1\n",  # tags
        "a: {b: 1}\n",  # flow collections
        "a: [1, 2]\n",
        "a: |\n  text\n",  # block scalars
        "a: >\n  text\n",
        "a: one\n  two\n",  # a multi-line plain scalar
        "a: 1 # comment\n",
        "a: 1\na: 2\n",  # a duplicate key: PyYAML's error
        "<<: {a: 1}\n",
        "a:\tb\n",  # tabs
        "a: caf\u00e9\n",  # non-ASCII
        "a: 'it''s'\n",  # escapes
        'a: "x\\ny"\n',
        "--- a: 1\n",
        "a: 1\n...\n",
        "plain scalar document\n",
        "a: 1\n  b: 2\n",  # bad indentation
        "? complex\n: key\n",
        "a: - b\n",
        "%YAML 1.1\n---\na: 1\n",
        "a: =\n",
    ],
)
def test_declines_what_it_does_not_know(text: str) -> None:
    assert fast(text) is None


def test_bulk_manifest_through_kube_yaml() -> None:
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"s{i}", "namespace": "bench", "annotations": {"a/b": "random"}},
            "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250}", "ports": [{"port": 80}]},
        }
        for i in range(500)
    ]
    text = yaml.safe_dump_all(docs)
    assert fast(text) == docs
    assert kube_yaml.load_all(text, "f") == docs


def test_errors_still_come_from_pyyaml() -> None:
    with pytest.raises(Exception, match="duplicate key"):
        kube_yaml.load_all("a: 1\na: 2\n", "f.yaml")


def test_gc_pause_nests() -> None:
    assert gc.isenabled()
    with gcpause.paused():
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.fixture
def split_always(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """load_all_split forking at any size and with pytest's threads about; the forks made."""
    forks: list[int] = []
    real_fork = fast_yaml.os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(fast_yaml, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(fast_yaml.threading, "active_count", lambda: 1)
    monkeypatch.setattr(fast_yaml.os, "fork", fork)
    return forks


def split(text: str) -> list[Any] | None:
    return fast_yaml.load_all_split(text, kube_yaml._Loader(""))


def test_split_reading_gives_exactly_what_one_reader_gives(split_always: list[int]) -> None:
    docs: list[Any] = [{"n": i, 80: "http", "flag": True, "x": None} for i in range(200)]
    text = yaml.safe_dump_all(docs[:100]) + "---\n---\n" + yaml.safe_dump_all(docs[100:])
    expected = fast(text)
    assert expected is not None and len(expected) == 201  # the empty document is kept
    got = split(text)
    assert got == expected and [type(k) for k in got[-1]] == [type(k) for k in expected[-1]]
    assert len(split_always) == 1


@pytest.mark.parametrize("where", ["first", "second"])
def test_split_reading_declines_when_either_half_does(split_always: list[int], where: str) -> None:
    halves = [yaml.safe_dump_all([{"n": i} for i in range(100)]) for _ in range(2)]
    index = 0 if where == "first" else 1
    halves[index] = halves[index].replace("n: 50\n", "n: &anchor 50\n")
    text = halves[0] + "---\n" + halves[1]
    assert fast(text) is None
    assert split(text) is None
    assert len(split_always) == 1
