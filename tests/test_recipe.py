"""The recipe schema: every shipped recipe loads; errors name the key; overrides coerce."""

from pathlib import Path

import pytest

from mlx_distill.errors import BadInput
from mlx_distill.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "quickstart.yaml" in names and "quickstart_teacher.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.name == (path.stem if "name" not in path.read_text() else recipe.name)
    # The resolved recipe is itself a valid recipe that resolves to the same values.
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(recipe.to_yaml())
    assert load_recipe(resolved).to_dict() == recipe.to_dict()


def test_unknown_key_names_path_and_closest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  stepz: 10\n")
    with pytest.raises(BadInput, match=r"unknown recipe key train\.stepz; did you mean 'steps'\?"):
        load_recipe(path)


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(BadInput, match=r"train\.steps: expected int, got 'many'"):
        load_recipe(path)


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  steps: 3\n bad: [\n")
    with pytest.raises(BadInput, match=r"r\.yaml line \d+: invalid YAML"):
        load_recipe(path)


def test_set_overrides_coerce_through_schema():
    recipe = load_recipe(
        None,
        [
            "train.lr=1e-5",  # YAML reads this as a string
            "train.steps=12",
            "train.grad_checkpoint=true",
            "student.path=null",
            "loss.kind=jsd",
            "stages=tokenizer,teacher",
            "cache.temperature=2",
        ],
    )
    assert recipe.train.lr == pytest.approx(1e-5) and isinstance(recipe.train.lr, float)
    assert recipe.train.steps == 12
    assert recipe.train.grad_checkpoint is True
    assert recipe.loss.kind == "jsd"
    assert recipe.stages == ["tokenizer", "teacher"]
    assert recipe.cache.temperature == 2.0 and isinstance(recipe.cache.temperature, float)


def test_set_rejects_bad_values():
    with pytest.raises(
        BadInput, match=r"^--set loss\.kind=kl: recipe key loss\.kind: 'kl' is not one of"
    ):
        load_recipe(None, ["loss.kind=kl"])
    with pytest.raises(
        BadInput,
        match=r"^--set train\.steps=1\.5: recipe key train\.steps: expected int, got 1\.5$",
    ):
        load_recipe(None, ["train.steps=1.5"])
    with pytest.raises(BadInput, match="key.path=value"):
        load_recipe(None, ["train.steps"])
    with pytest.raises(BadInput, match=r"^--set trian\.steps=3: unknown recipe key trian"):
        load_recipe(None, ["trian.steps=3"])
    # one key blamed, not two
    with pytest.raises(
        BadInput,
        match=r"^--set loss\.temperature=0: recipe key loss\.temperature: must be > 0, got 0\.0$",
    ):
        load_recipe(None, ["loss.temperature=0"])
    # an error that names no --set key is blamed on the recipe (here: the defaults)
    with pytest.raises(BadInput, match=r"^defaults: recipe key loss\.temperature: 1\.0 differs"):
        load_recipe(None, ["cache.temperature=0.5"])


def test_defaults_come_from_the_schema():
    assert load_recipe(None).to_dict() == Recipe().to_dict()


def test_section_hash_tracks_only_its_sections():
    a = load_recipe(None)
    b = load_recipe(None, ["train.steps=7"])
    assert a.section_hash("cache") == b.section_hash("cache")
    assert a.section_hash("train") != b.section_hash("train")


def test_loss_temperature_must_match_the_local_topk_cache():
    with pytest.raises(BadInput, match=r"loss.temperature: 2.0 differs from cache.temperature 1.0"):
        load_recipe(None, ["loss.temperature=2"])
    recipe = load_recipe(None, ["loss.temperature=2", "cache.temperature=2"])
    assert recipe.loss.temperature == recipe.cache.temperature == 2.0
    # Nothing to match when the run does not distill from the cache.
    assert load_recipe(None, ["loss.temperature=2", "stages=tokenizer,teacher,cache"])


def test_student_layers_override():
    recipe = load_recipe(None, ["student.init=teacher_layers", "student.layers=0,2"])
    assert recipe.student.layers == [0, 2]
    for bad in ("0,0", "-1,2"):
        with pytest.raises(BadInput, match="student.layers: expected distinct layer indices"):
            load_recipe(None, [f"student.layers={bad}"])


def test_choice_fields_come_from_one_list():
    from mlx_distill.recipe import LossKind, choices

    assert choices(LossKind) == ("forward_kl", "reverse_kl", "jsd", "tvd", "ce")
    with pytest.raises(BadInput) as e:
        load_recipe(None, ["loss.kind=kl"])
    assert str(e.value).endswith(
        "recipe key loss.kind: 'kl' is not one of forward_kl, reverse_kl, jsd, tvd, ce"
    )
    # A recipe built in Python is checked against the same list.
    recipe = Recipe()
    recipe.cache.targets = "dense"
    with pytest.raises(BadInput, match="cache.targets: 'dense' is not one of topk, sample"):
        recipe.validate()


def test_defaults_are_not_the_quickstarts():
    recipe = Recipe()
    assert recipe.data.train is None and recipe.data.test is None and recipe.data.task is None
    assert recipe.data.max_seq_len >= 1024 and recipe.tokenizer.vocab_size >= 4096
