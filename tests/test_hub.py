"""Hub ids for models and data, offline: a Hub cache populated by hand in its real layout
(`models--org--name/{refs,snapshots/<commit>,blobs}`) under a temporary HF_HOME, with
HF_HUB_OFFLINE=1. No network."""

import hashlib
import http.server
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import tiny

from mlx_distill import hub
from mlx_distill.errors import BadInput
from mlx_distill.recipe import DataConfig, DatasetConfig, load_recipe
from mlx_distill.text.data import read_jsonl, read_split

TEACHER = tiny.ROOT / "data" / "quickstart" / "teacher"
REPO = "mlx-distill-test/quickstart-teacher"
COMMIT = "a" * 40
PINNED = "b" * 40  # another commit of the same repo, reached by its tag v1


def populate(
    hub_dir: Path, repo: str, files: dict[str, bytes], commit: str, *refs: str, kind="model"
):
    """Put `files` ({path in repo: content}) into the Hub cache `hub_dir` as huggingface_hub
    lays a download out: content in blobs/, the snapshot as relative symlinks to them, each of
    `refs` (branch or tag names) a file holding the commit."""
    root = hub_dir / f"{kind}s--{repo.replace('/', '--')}"
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return root / "snapshots" / commit


def folder_files(folder: Path, skip=()) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in skip}


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """A temporary HF_HOME, offline, whose Hub cache holds the quickstart teacher as REPO (main
    at COMMIT; tag v1 at PINNED, a copy with another config.json)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = folder_files(TEACHER)
    populate(home / "hub", REPO, files, COMMIT, "main")
    config = json.loads(files["config.json"])
    config["rms_norm_eps"] = 1e-6
    files["config.json"] = json.dumps(config).encode()
    populate(home / "hub", REPO, files, PINNED, "v1")
    return home


def test_ids_resolve_to_the_cached_snapshot(offline_home):
    snapshots = offline_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert hub.model_folder("teacher.path", REPO) == str(snapshots / COMMIT)
    pinned = Path(hub.model_folder("teacher.path", f"{REPO}@v1"))
    assert pinned == snapshots / PINNED
    assert json.loads((pinned / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert hub.model_folder("teacher.path", f"{REPO}@{PINNED}") == str(snapshots / PINNED)
    assert hub.portable(str(pinned)) == f"{REPO}@{PINNED}"
    # local paths, and paths that are no ids, are left as written
    assert hub.model_folder("teacher.path", str(TEACHER)) == str(TEACHER)
    assert hub.model_folder("teacher.path", "runs/x/teacher/model") == "runs/x/teacher/model"


def test_not_cached_offline_is_one_line(offline_home):
    with pytest.raises(BadInput) as e:
        hub.model_folder("student.path", "mlx-community/Qwen2.5-0.5B-Instruct-bf16@v2")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("recipe key student.path: mlx-community/Qwen2.5-0.5B-Instruct-bf16")
    assert "HF_HUB_OFFLINE=1" in message and "(revision v2)" in message
    assert "hf download mlx-community/Qwen2.5-0.5B-Instruct-bf16 --revision v2" in message


def test_config_only_snapshot(offline_home):
    """`config_folder` serves a snapshot fetched without weights; a model path refuses it."""
    files = folder_files(TEACHER, skip={"model.safetensors"})
    populate(offline_home / "hub", "org/config-only", files, "c" * 40, "main")
    folder = hub.config_folder("org/config-only")
    assert json.loads((folder / "config.json").read_text()) == json.loads(
        (TEACHER / "config.json").read_text()
    )
    assert hub.config_folder(TEACHER) == TEACHER
    with pytest.raises(BadInput, match=r"has no model\*.safetensors weights"):
        hub.model_folder("teacher.path", "org/config-only")


def test_plan_sizes_hub_ids_from_their_config_alone(offline_home, tmp_path, monkeypatch, capsys):
    """`plan` on a recipe naming Hub repos whose cache holds only config and tokenizer files
    (what `config_folder` fetches): sized as the same folders with weights are, time not
    estimated (no weights), nothing written."""
    files = folder_files(TEACHER, skip={"model.safetensors"})
    populate(offline_home / "hub", "org/config-only", files, "c" * 40, "main")
    sets = tiny.quickstart_sets(tmp_path / "runs", "teacher.path=org/config-only")
    sets += ["--set", "tokenizer.path=org/config-only"]
    code, out, err = tiny.main(
        monkeypatch, capsys, "plan", "recipes/quickstart.yaml", *sets, "--json"
    )
    assert code in (0, None), err
    by_hub = json.loads(out)
    code, out, _ = tiny.main(
        monkeypatch,
        capsys,
        "plan",
        "recipes/quickstart.yaml",
        *tiny.quickstart_sets(tmp_path / "runs"),
        "--json",
    )
    local = json.loads(out)
    peaks = {name: stage["peak_bytes"] for name, stage in local["stages"].items()}
    assert {name: stage["peak_bytes"] for name, stage in by_hub["stages"].items()} == peaks
    assert not (tmp_path / "runs").exists()


def _teach(tmp_path, *extra, env=None):
    args = tiny.quickstart_sets(
        tmp_path / "runs",
        f"teacher.path={REPO}",
        f"tokenizer.path={REPO}",
        "student.init=config",  # no teacher_layers: the teacher stages alone
        *extra,
    )
    return tiny.cli("teach", "recipes/quickstart.yaml", *args, "--json", env=env)


@pytest.mark.slow
def test_recipe_of_hub_ids_runs_offline_and_records_the_commit(offline_home, tmp_path):
    env = {"HF_HOME": str(offline_home), "HF_HUB_OFFLINE": "1"}
    proc = _teach(tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stages"] == {
        "tokenizer": "ran",
        "teacher": "ran",
        "cache": "ran",
    }
    run = tmp_path / "runs" / "quickstart"
    teacher = json.loads((run / "teacher" / "stage.json").read_text())
    assert teacher["inputs"]["sections"]["teacher"]["path"] == f"{REPO}@{COMMIT}"
    snapshot = offline_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert json.loads((run / "teacher" / "teacher.json").read_text())["path"] == str(snapshot)
    saved = load_recipe(run / "recipe.yaml")  # the folder the run read
    assert saved.teacher.path == saved.tokenizer.path == str(snapshot)
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    assert manifest["rows"] == 16

    # The same recipe with the folder written out is the same run: every stage is up to date.
    again = _teach(tmp_path, f"teacher.path={snapshot}", f"tokenizer.path={snapshot}", env=env)
    assert json.loads(again.stdout)["stages"] == {
        "tokenizer": "skipped",
        "teacher": "skipped",
        "cache": "skipped",
    }
    # Another revision is another teacher: its stages run again.
    pinned = _teach(tmp_path, f"teacher.path={REPO}@v1", f"tokenizer.path={REPO}@v1", env=env)
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["stages"]["teacher"] == "ran"
    teacher = json.loads((run / "teacher" / "stage.json").read_text())
    assert teacher["inputs"]["sections"]["teacher"]["path"] == f"{REPO}@{PINNED}"


def test_repo_not_cached_fails_before_writing(offline_home, tmp_path, monkeypatch, capsys):
    code, _, err = tiny.main(
        monkeypatch,
        capsys,
        "teach",
        "recipes/quickstart.yaml",
        *tiny.quickstart_sets(tmp_path / "runs", "teacher.path=org/not-cached"),
    )
    line = tiny.one_line(code, err)
    assert "recipe key teacher.path: org/not-cached is not a local path, HF_HUB_OFFLINE=1" in line
    assert "hf download org/not-cached" in line
    assert not (tmp_path / "runs").exists()


# -- data --------------------------------------------------------------------------------------

ROWS = [
    {"question": "1 + 2?", "answer": "3", "level": 1},
    {"question": "2 + 5?", "answer": "7", "level": 2},
    {"question": "4 + 4?", "answer": "8", "level": 1},
]
FEATURES = DatasetConfig(prompt_feature="question", completion_feature="answer")


def _as_jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _expected(tmp_path):
    path = tmp_path / "expected.jsonl"
    path.write_text(
        _as_jsonl([dict(r, prompt=r["question"], completion=r["answer"]) for r in ROWS])
    )
    return read_jsonl(path)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A temporary HF_HOME: datasets' Arrow cache goes there (hub.hf_home)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    return tmp_path / "hf"


@pytest.mark.parametrize("form", ["jsonl", "parquet", "save_to_disk"])
def test_local_dataset_folder_reads_the_same_records(tmp_path, home, form):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    train, test = datasets.Dataset.from_list(ROWS), datasets.Dataset.from_list(ROWS[:1])
    if form == "jsonl":
        (folder / "train.jsonl").write_text(_as_jsonl(ROWS))
        (folder / "test.jsonl").write_text(_as_jsonl(ROWS[:1]))
    elif form == "parquet":
        train.to_parquet(str(folder / "train.parquet"))
        test.to_parquet(str(folder / "test.parquet"))
    else:
        datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    data = DataConfig(train=str(folder), test=str(folder), dataset=FEATURES)
    records = read_split(data, "train")
    assert [dict(r) for r in records] == [dict(r) for r in _expected(tmp_path)]
    assert [r.shape for r in records] == ["chat"] * 3
    assert records[1].source == f"{folder} [train] line 2"
    assert [r["completion"] for r in read_split(data, "test")] == ["3"]
    assert len(read_split(data, "train", limit=2)) == 2
    if form != "save_to_disk":  # datasets' Arrow cache is under HF_HOME, read at call time
        assert list((home / "datasets").rglob("*.arrow"))


def test_dataset_split_or_column_missing_is_one_line(tmp_path, home):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(_as_jsonl(ROWS))
    with pytest.raises(BadInput, match=r"recipe key data.test: .*test") as e:
        read_split(DataConfig(test=str(folder), dataset=FEATURES), "test")
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match=r"\[train\] line 1: expected keys prompt\+completion"):
        read_split(DataConfig(train=str(folder)), "train")  # no mapping: no prompt column


def test_hub_dataset_id_from_the_cache(offline_home, tmp_path):
    datasets = pytest.importorskip("datasets")
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    card = (
        b"---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
        b"    path: main/train-*.parquet\n---\n"
    )
    files = {"main/train-00000-of-00001.parquet": parquet.read_bytes(), "README.md": card}
    snapshot = populate(offline_home / "hub", "org/sums", files, "d" * 40, "main", kind="dataset")
    data = DataConfig(
        train="org/sums",
        dataset=DatasetConfig(
            config="main", prompt_feature="question", completion_feature="answer"
        ),
    )
    records = read_split(data, "train")
    assert [dict(r) for r in records] == [dict(r) for r in _expected(tmp_path)]
    assert hub.dataset_folder("data.train", "org/sums") == str(snapshot)
    assert (
        hub.folder_digest(snapshot)
        == hashlib.sha256(f"org/sums@{'d' * 40}".encode()).hexdigest()[:16]
    )
    # a local JSONL path that is missing stays a file path, not a dataset id
    assert hub.dataset_folder("data.train", "data/missing.jsonl") == "data/missing.jsonl"
    with pytest.raises(BadInput, match="no snapshot of Hub dataset repo org/other"):
        read_split(DataConfig(train="org/other"), "train")


def test_recipe_keys_and_fingerprint_of_a_dataset_folder(tmp_path):
    """data.dataset is hashed only when a split is a dataset folder; the folder's content is."""
    from mlx_distill.run.fingerprints import stage_inputs

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(_as_jsonl([{"prompt": "a", "completion": "b"}]))
    recipe = load_recipe("recipes/quickstart.yaml", [f"data.train={jsonl}"])
    prints, inputs = stage_inputs(recipe)
    assert "dataset" not in inputs["distill"]["sections"]["data"]
    base = stage_inputs(load_recipe("recipes/quickstart.yaml"))[0]
    changed = load_recipe("recipes/quickstart.yaml", ["data.dataset.prompt_feature=q"])
    assert stage_inputs(changed)[0] == base  # JSONL files: the dataset settings are not read

    folder = tmp_path / "ds"
    folder.mkdir()
    shutil.copy(jsonl, folder / "train.jsonl")
    recipe = load_recipe("recipes/quickstart.yaml", [f"data.train={folder}"])
    prints, inputs = stage_inputs(recipe)
    assert inputs["distill"]["sections"]["data"]["dataset"]["train_split"] == "train"
    (folder / "train.jsonl").write_text(_as_jsonl([{"prompt": "a", "completion": "c"}]))
    assert stage_inputs(recipe)[0]["distill"] != prints["distill"]


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's API as huggingface_hub reads its refusals: 404 with X-Error-Code RepoNotFound
    for repo `org/missing`, RevisionNotFound for any other repo's revision."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        code = "RepoNotFound" if "/org/missing/" in self.path else "RevisionNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def online_home(tmp_path, monkeypatch):
    """HF_HOME empty and online, HF_ENDPOINT a loopback fake of the Hub's API."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: an earlier test may have set it
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()


def test_online_refusals_are_one_line(online_home, monkeypatch):
    with pytest.raises(BadInput) as e:
        hub.model_folder("teacher.path", "org/missing")
    assert str(e.value) == (
        "recipe key teacher.path: org/missing is not a local path, and the Hub has no model "
        "repo org/missing (or it is private: set HF_TOKEN)"
    )
    with pytest.raises(BadInput) as e:
        hub.dataset_folder("data.train", "org/present@v9")
    assert (
        str(e.value) == "recipe key data.train: the Hub dataset repo org/present has no revision v9"
    )
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{tiny.free_ports(1)[0]}")  # nothing there
    with pytest.raises(BadInput, match="org/any is not a local path, the Hub cannot be reached"):
        hub.model_folder("tokenizer.path", "org/any")


@pytest.mark.slow
def test_teach_reads_a_dataset_folder_as_its_jsonl(tmp_path):
    """The quickstart's training rows as parquet with other column names, mapped back by
    data.dataset: the teacher cache holds the same rows and tokens as from the JSONL file."""
    datasets = pytest.importorskip("datasets")
    rows = read_jsonl(tiny.ROOT / "data" / "quickstart" / "train.jsonl", limit=16)
    renamed = [
        {"question": r["prompt"], "solution": r["completion"], "answer": r["answer"]} for r in rows
    ]
    folder = tmp_path / "arith"
    folder.mkdir()
    datasets.Dataset.from_list(renamed).to_parquet(str(folder / "train.parquet"))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    manifests = []
    for name, extra in (
        ("jsonl", []),
        (
            "folder",
            [
                f"data.train={folder}",
                "data.dataset.prompt_feature=question",
                "data.dataset.completion_feature=solution",
            ],
        ),
    ):
        args = tiny.quickstart_sets(tmp_path / name, "student.init=config", *extra)
        proc = tiny.cli("teach", "recipes/quickstart.yaml", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        run = tmp_path / name / "quickstart"
        manifests.append(json.loads((run / "cache" / "manifest.json").read_text()))
    stage = json.loads((run / "cache" / "stage.json").read_text())
    assert stage["inputs"]["sections"]["data"]["dataset"]["prompt_feature"] == "question"
    assert stage["inputs"]["data_files"]["train"] == hub.folder_digest(folder)
    assert manifests[0]["rows"] == manifests[1]["rows"] == 16
    assert manifests[0]["tokens"] == manifests[1]["tokens"]
    shards = [m["shards"] for m in manifests]
    assert [s["sha256"] for s in shards[0]] == [s["sha256"] for s in shards[1]]


def test_without_datasets_a_dataset_folder_names_the_extra(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(_as_jsonl(ROWS))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(BadInput, match=r"pip install 'mlx-distill\[hub\]'"):
        read_split(DataConfig(train=str(folder)), "train")
    jsonl = tmp_path / "train.jsonl"  # a JSONL file needs no datasets (and maps no columns)
    jsonl.write_text(
        _as_jsonl([{"prompt": r["question"], "completion": r["answer"]} for r in ROWS])
    )
    assert [r["completion"] for r in read_split(DataConfig(train=str(jsonl)), "train")] == [
        "3",
        "7",
        "8",
    ]


def test_chat_rows_from_parquet_read_as_written(tmp_path, home):
    """Arrow gives every turn the keys of all turns; a turn reads back with only its own."""
    datasets = pytest.importorskip("datasets")
    conversation = [
        {"role": "system", "content": "Be brief.", "name": "rules"},
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"},
    ]
    folder = tmp_path / "chat"
    folder.mkdir()
    rows = [{"conversation": conversation, "source": "hand"}]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    data = DataConfig(train=str(folder), dataset=DatasetConfig(chat_feature="conversation"))
    (record,) = read_split(data, "train")
    assert record["messages"] == conversation
    assert record["source"] == "hand" and record.shape == "chat"
    assert record["prompt"] == "1 + 1?" and record["completion"] == "2"
