"""The bundled benchmark (generator, storage, streaming), Hub-style loading, and model batches."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from vtr_jax.data import scenes, vqa
from vtr_jax.data.tokenizer import Tokenizer
from vtr_jax.models import vit

SMALL = scenes.SceneConfig(image_size=64)  # same layouts as 256 px, cheaper pixels
VISION = vit.VisionConfig(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=2)
PLURAL_TO_SHAPE = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star",
                   "crosses": "cross"}


def _digest(example: scenes.Example) -> str:
  return hashlib.sha256(example.image.tobytes() + example.question.encode() + example.answer.encode()).hexdigest()


@pytest.fixture(scope="module")
def val_examples() -> list[scenes.Example]:
  return [scenes.generate_example("val", i, SMALL) for i in range(7 * 128)]  # 128 turns: every code twice


# -- generator --------------------------------------------------------------------------------

def test_same_index_same_bytes_in_any_order():
  forward = [scenes.generate_example("train", i) for i in (3, 4, 5)]
  backward = [scenes.generate_example("train", i) for i in (5, 4, 3)][::-1]
  for a, b in zip(forward, backward):
    assert a.image.dtype == np.uint8 and a.image.shape == (256, 256, 3)
    assert _digest(a) == _digest(b) and a.scene == b.scene
  assert len({_digest(e) for e in forward}) == 3


def test_layout_does_not_depend_on_image_size():
  big, small = scenes.generate_example("val", 11), scenes.generate_example("val", 11, SMALL)
  assert (big.question, big.answer, big.scene) == (small.question, small.answer, small.scene)
  assert small.image.shape == (64, 64, 3)


def test_splits_differ_and_test_seed_is_held_out():
  assert len(set(scenes.SPLIT_SEEDS.values())) == 3
  test = {_digest(scenes.generate_example("test", i, SMALL)) for i in range(70)}
  # The first train/val examples, and those an additive seed scheme (seed + index) would share with test.
  offset = scenes.SPLIT_SEEDS["test"] - scenes.SPLIT_SEEDS["train"]
  others = [("train", i) for i in [*range(70), *range(offset, offset + 70)]] + [("val", i) for i in range(70)]
  assert not test & {_digest(scenes.generate_example(s, i, SMALL)) for s, i in others}


def test_every_family_in_turn_and_answers_balanced(val_examples):
  by_family = collections.defaultdict(list)
  for e in val_examples:
    assert e.family == scenes.FAMILIES[e.index % 7]
    by_family[e.family].append(e.answer)
  assert sorted(by_family) == sorted(scenes.FAMILIES)
  for family, answers in by_family.items():
    allowed = scenes.answer_set(family)
    assert set(answers) <= set(allowed), family
    counts = collections.Counter(answers)
    assert set(counts) == set(allowed), (family, counts)
    if family == "larger":  # cycles which one is larger; the words themselves are random
      assert max(counts.values()) <= 3 * len(answers) / len(allowed), counts
    else:  # the answer itself cycles
      assert max(counts.values()) - min(counts.values()) <= 1, (family, counts)
  relations = collections.Counter((re.search(r"left of|right of|above|below", e.question)[0], e.answer)
                                  for e in val_examples if e.family == "spatial")
  assert len(relations) == 8 and set(relations.values()) == {16}, relations


def _rect(o: scenes.SceneObject):
  return (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)


def _relation_holds(relation: str, a, b) -> bool:
  """Bounding boxes strictly apart on the relation's axis (x right, y down)."""
  return {"left of": a[2] < b[0], "right of": b[2] < a[0], "above": a[3] < b[1], "below": b[3] < a[1]}[relation]


def _oracle(question: str, scene: scenes.Scene) -> str:
  """Recomputes the answer from the stored objects, asserting that every reference is unique."""
  objs = scene.objects

  def the(pred):
    matches = [o for o in objs if pred(o)]
    assert len(matches) == 1, (question, matches)
    return matches[0]

  if m := re.fullmatch(r"what colour is the (\w+) \?", question):
    return the(lambda o: o.shape == m[1]).colour
  if m := re.fullmatch(r"what shape is the (\w+) object \?", question):
    return the(lambda o: o.colour == m[1]).shape
  if question == "how many objects are there ?":
    return str(len(objs))
  if m := re.fullmatch(r"how many (\w+) objects are there \?", question):
    return str(sum(o.colour == m[1] for o in objs))
  if m := re.fullmatch(r"how many (\w+) are there \?", question):
    return str(sum(o.shape == PLURAL_TO_SHAPE[m[1]] for o in objs))
  if m := re.fullmatch(r"is there a (\w+) (\w+) \?", question):
    return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
  if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?", question):
    a = _rect(the(lambda o: (o.colour, o.shape) == (m[1], m[2])))
    b = _rect(the(lambda o: (o.colour, o.shape) == (m[4], m[5])))
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[m[3]]
    holds, converse = _relation_holds(m[3], a, b), _relation_holds(opposite, a, b)
    assert holds != converse, f"{question}: neither clearly true nor clearly false"
    return "yes" if holds else "no"
  if m := re.fullmatch(r"which is larger , the (\w+) (\w+) or the (\w+) (\w+) \?", question):
    a = the(lambda o: (o.colour, o.shape) == (m[1], m[2]))
    b = the(lambda o: (o.colour, o.shape) == (m[3], m[4]))
    assert max(a.r, b.r) >= 1.4 * min(a.r, b.r), "sizes too close to call"
    words_a, words_b = (m[1], m[2]), (m[3], m[4])
    differing = [i for i in range(2) if words_a[i] != words_b[i]]
    assert len(differing) == 1, question
    return (words_a if a.r > b.r else words_b)[differing[0]]
  assert question == "what is written in the box ?", question
  return scene.code.lower()


def test_answers_recomputed_from_scene_metadata(val_examples):
  for e in val_examples:
    assert _oracle(e.question, e.scene) == e.answer, (e.index, e.question)


def test_scene_geometry_is_sound(val_examples):
  for e in val_examples:
    objs = e.scene.objects
    assert 1 <= len(objs) <= 6
    items = [_rect(o) for o in objs] + [e.scene.box]
    for i, a in enumerate(items):
      assert 0 <= a[0] < a[2] <= 1 and 0 <= a[1] < a[3] <= 1
      for b in items[:i]:
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (e.index, a, b)
    for o in objs:
      lo, hi = scenes.SIZES[o.size]
      assert lo <= o.r <= hi


def _pixel_rect(rect, size: int, pad: int):
  x0, y0, x1, y1 = (round(v * size) for v in rect)
  return slice(max(0, y0 - pad), y1 + pad), slice(max(0, x0 - pad), x1 + pad)


def test_rendering_shows_the_scene():
  least_saturated_object = min(max(c) - min(c) for c in scenes.COLOURS.values()) - 2 * scenes.COLOUR_JITTER
  for i in range(14):
    e = scenes.generate_example("test", i)
    s = e.image.shape[0]
    for o in e.scene.objects:  # every shape covers its centre, in its own jittered palette colour
      assert tuple(e.image[int(o.y * s), int(o.x * s)]) == o.rgb
      assert np.abs(np.subtract(o.rgb, scenes.COLOURS[o.colour])).max() <= scenes.COLOUR_JITTER
    box = e.image[_pixel_rect(e.scene.box, s, -1)].reshape(-1, 3)
    assert (box == e.scene.box_rgb).all(axis=1).mean() > 0.5  # mostly the light fill ...
    assert (box.astype(int).sum(axis=1) < 3 * 100).mean() > 0.05  # ... with dark glyphs
    free = np.ones((s, s), bool)
    for rect in [e.scene.box, *(o.rect for o in e.scene.objects)]:
      free[_pixel_rect(rect, s, 2)] = False
    background = e.image[free].astype(int)  # [P, 3]
    assert background.std(axis=0).max() > 3  # textured, not flat ...
    # ... and never as saturated as an object, so nothing hides in it.
    assert (background.max(axis=1) - background.min(axis=1)).max() < least_saturated_object


def test_scene_json_round_trip_renders_the_same_image():
  e = scenes.generate_example("val", 5)
  scene = scenes.Scene.from_json(e.scene.to_json())
  assert scene == e.scene
  np.testing.assert_array_equal(scenes.render(scene, 256), e.image)


def test_generator_errors_name_the_values():
  with pytest.raises(ValueError, match=r"unknown split 'dev'; known: train, val, test"):
    scenes.generate_example("dev", 0)
  with pytest.raises(ValueError, match=r"families must be .* got \('colour', 'size'\)"):
    scenes.SceneConfig(families=("colour", "size"))


# -- vocabulary and prompts ----------------------------------------------------------------------

def test_vocabulary_covers_prompts_and_answers_are_single_tokens(val_examples):
  tok = vqa.tokenizer()
  vocab = vqa.vocabulary()
  assert len(vocab) == len(set(vocab)) and vocab == vqa.vocabulary()
  assert vocab[:3] == ["question", ":", "answer"]  # ids are part of a trained model: the order is fixed
  unk = tok.token_id("<unk>")
  lengths = collections.defaultdict(set)
  for e in val_examples:
    ids = tok.encode(vqa.format_prompt(e.question))
    assert unk not in ids and ids.count(tok.image_token_id) == 1, e.question
    assert [tok.backend.id_to_token(i) for i in ids] == ["<image>", "question", ":", *e.question.split(), "answer", ":"]
    lengths[e.family].add(len(ids))
    answer = tok.encode(e.answer, add_special_tokens=False)
    assert len(answer) == 1 and answer[0] != unk and vocab.index(e.answer) + 5 == answer[0], e.answer
  assert max(lengths["larger"]) == max(max(v) for v in lengths.values()) == vqa.PROMPT_LENGTH, lengths
  assert vqa.format_prompt("<image>\nIs there a dog?") == "<image> question: Is there a dog? answer:"


# -- storage ------------------------------------------------------------------------------------

def test_dataset_round_trip(tmp_path):
  built = vqa.build(str(tmp_path / "bench"), {"train": 7, "test": 9}, SMALL)
  assert sorted(built) == ["test", "train"]
  test = vqa.load(str(tmp_path / "bench"), "test")
  assert isinstance(test.features["image"], datasets.Image) and len(test) == 9
  for row in test:
    e = scenes.generate_example("test", row["index"], SMALL)
    np.testing.assert_array_equal(np.asarray(row["image"]), e.image)
    assert (row["question"], row["answer"], row["family"]) == (e.question, e.answer, e.family)
    assert scenes.Scene.from_json(row["scene"]) == e.scene
  with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; pass split="):
    vqa.load(str(tmp_path / "bench"))
  with pytest.raises(ValueError, match=r"split 'val' is not in .*; available splits: \['train', 'test'\]"):
    vqa.load(str(tmp_path / "bench"), "val")


def test_build_split_in_memory_from_any_start_with_workers():
  ds = vqa.build_split("val", 3, SMALL, start=40)
  assert ds["index"] == [40, 41, 42] and not ds.cache_files
  np.testing.assert_array_equal(np.asarray(ds[1]["image"]), scenes.generate_example("val", 41, SMALL).image)
  parallel = vqa.build_split("val", 3, SMALL, start=40, workers=1)
  assert parallel.with_format("arrow")[:].equals(ds.with_format("arrow")[:])


def test_stream_steps_are_fixed_and_parallel_matches_serial():
  serial = vqa.stream("train", 3, first_step=2, num_examples=10, config=SMALL)
  steps = [next(serial) for _ in range(3)]
  assert [[r["index"] for r in rows] for rows in steps] == [[6, 7, 8], [9, 0, 1], [2, 3, 4]]
  np.testing.assert_array_equal(steps[1][1]["image"], scenes.generate_example("train", 0, SMALL).image)
  parallel = vqa.stream("train", 3, first_step=2, num_examples=10, config=SMALL, workers=2)
  for rows in steps:
    got = next(parallel)
    assert [(r["index"], r["question"], r["image"].tobytes()) for r in got] == \
        [(r["index"], r["question"], r["image"].tobytes()) for r in rows]
  parallel.close()


# -- Hub-style datasets ---------------------------------------------------------------------------

def _images(n: int, size=(40, 30)) -> list[Image.Image]:
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _pope() -> datasets.Dataset:
  return datasets.Dataset.from_dict(
      {"question_id": ["1", "2", "3"],
       "question": ["Is there a dog in the image?"] * 2 + ["Is there a cat in the image?"],
       "answer": ["yes", "no", "no"], "image_source": ["a", "b", "c"],
       "category": ["adversarial", "popular", "random"], "image": _images(3)},
      features=datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image_source": datasets.Value("string"),
                                  "category": datasets.Value("string"), "image": datasets.Image()}))


def test_pope_schema_from_save_to_disk_and_hub_parquet_layout(tmp_path):
  pope = _pope()
  pope.save_to_disk(str(tmp_path / "pope"))
  os.makedirs(tmp_path / "hub" / "data")
  pope.to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
  for source, split in [(tmp_path / "pope", None), (tmp_path / "hub", "test")]:
    ds = vqa.load(str(source), split, columns={"family": "category"}, cache_dir=str(tmp_path / "cache"))
    assert ds["family"] == ["adversarial", "popular", "random"] and ds["answer"] == ["yes", "no", "no"]
    assert "category" not in ds.column_names and "question_id" in ds.column_names
    np.testing.assert_array_equal(np.asarray(ds[2]["image"]), np.asarray(pope[2]["image"]))
  plain = vqa.load(str(tmp_path / "pope"))
  assert plain["family"] == ["all"] * 3 and plain["category"] == pope["category"]


def test_gqa_like_json_with_image_paths_and_answer_mapping(tmp_path):
  os.makedirs(tmp_path / "images")
  images = _images(2)
  for i, image in enumerate(images):
    image.save(tmp_path / "images" / f"n{i}.png")
  records = [{"id": f"q{i}", "imageId": f"images/n{i}.png", "question": q, "answer": a, "fullAnswer": f}
             for i, (q, a, f) in enumerate([("Is the cup on the left?", "yes", "Yes, the cup is on the left."),
                                             ("What colour is the car?", "red", "The car is red.")])]
  path = tmp_path / "testdev_balanced_questions.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records))
  ds = vqa.load(str(path), columns={"image": "imageId", "answer": "fullAnswer"}, cache_dir=str(tmp_path / "cache"))
  assert ds["answer"] == ["Yes, the cup is on the left.", "The car is red."]
  assert {"image", "question", "family"} <= set(ds.column_names) and "imageId" not in ds.column_names
  np.testing.assert_array_equal(np.asarray(ds[1]["image"]), np.asarray(images[1]))


@pytest.mark.parametrize("columns, missing", [
    ({"answer": "short_answer"}, r"column 'short_answer' \(for 'answer'\)"),
    ({"family": "type"}, r"column 'type' \(for 'family'\)"),
])
def test_unknown_column_names_it_and_the_available_ones(tmp_path, columns, missing):
  _pope().save_to_disk(str(tmp_path / "pope"))
  with pytest.raises(vqa.ColumnError, match=missing + r" is not in .*pope; available columns: \['question_id', "):
    vqa.load(str(tmp_path / "pope"), columns=columns)


def test_missing_default_column_and_unknown_standard_name(tmp_path):
  _pope().rename_column("question", "text").save_to_disk(str(tmp_path / "pope"))
  with pytest.raises(vqa.ColumnError, match=r"column 'question' \(for 'question'\) is not in .*'text'"):
    vqa.load(str(tmp_path / "pope"))
  assert vqa.load(str(tmp_path / "pope"), columns={"question": "text"})["question"][0] == "Is there a dog in the image?"
  with pytest.raises(vqa.ColumnError, match=r"maps \['label'\], which are not standard columns"):
    vqa.load(str(tmp_path / "pope"), columns={"label": "answer"})


# -- batches --------------------------------------------------------------------------------------

def test_prompt_batch_left_padded_with_one_placeholder(val_examples):
  tok = vqa.tokenizer()
  rows = [e.row() for e in val_examples[:7]]  # one of each family: prompts of different lengths
  batch = vqa.prompt_batch(rows, tok, VISION, length=vqa.PROMPT_LENGTH)
  assert batch.pixels.shape == (7, 64, 64, 3) and batch.pixels.dtype == np.float32
  assert batch.tokens.shape == batch.valid.shape == (7, vqa.PROMPT_LENGTH) and batch.tokens.dtype == np.int32
  np.testing.assert_allclose(batch.pixels, np.asarray(vit.preprocess(np.stack([r["image"] for r in rows]), VISION)))
  for tokens, valid, row in zip(batch.tokens, batch.valid, rows):
    n = valid.sum()
    assert not valid[:-n].any() and valid[-n:].all()  # left padding
    assert (tokens[:-n] == tok.pad_token_id).all()
    assert list(tokens[-n:]) == tok.encode(vqa.format_prompt(row["question"]))
    assert (tokens[valid] == tok.image_token_id).sum() == 1 and tokens[-n] == tok.image_token_id
  assert [tok.decode([i]) for i in batch.answer_ids] == [r["answer"] for r in rows]


def test_train_batch_masks_exactly_the_answer_and_its_end(val_examples):
  tok = vqa.tokenizer()
  rows = [e.row() for e in val_examples[:7]]
  batch = vqa.train_batch(rows, tok, VISION, length=vqa.TRAIN_LENGTH)
  assert batch.tokens.shape == batch.targets.shape == batch.loss_mask.shape == (7, vqa.TRAIN_LENGTH)
  np.testing.assert_array_equal(batch.targets[:, :-1], batch.tokens[:, 1:])
  for tokens, targets, mask, row in zip(batch.tokens, batch.targets, batch.loss_mask, rows):
    assert list(targets[mask]) == [tok.token_id(row["answer"]), tok.eos_token_id]
    assert tokens[np.nonzero(mask)[0][0]] == tok.token_id(":")  # predicted right after "answer :"
  assert not (batch.loss_mask & ~batch.valid).any()


def test_batches_of_hub_rows_resize_images_and_keep_one_placeholder():
  tok = Tokenizer.word_level(["question", ":", "answer", "is", "there", "a", "dog", "?", "yes", "it"])
  rows = [{"image": image, "question": q, "answer": a}
          for image, q, a in zip(_images(2, (40, 30)) + _images(1, (100, 120)),
                                 ["<image>\nis there a dog ?", "is there a dog ?", "is there a dog ?"],
                                 ["yes", "yes it is", "no"])]
  batch = vqa.train_batch(rows, tok, VISION)
  assert batch.pixels.shape == (3, 64, 64, 3)
  assert ((batch.tokens == tok.image_token_id) & batch.valid).sum(axis=1).tolist() == [1, 1, 1]
  assert batch.loss_mask.sum(axis=1).tolist() == [2, 4, 2]  # "yes it is" is three tokens, plus the end
  with pytest.raises(ValueError, match=r"answer 'yes it is' is 3 tokens; answer_ids needs one-token answers"):
    vqa.prompt_batch(rows, tok, VISION)


def test_render_preview_writes_a_png(tmp_path):
  scenes.render_preview(str(tmp_path / "preview.png"), n=3, config=SMALL, columns=3)
  with Image.open(tmp_path / "preview.png") as im:
    assert im.format == "PNG" and im.size[0] > im.size[1] > 100
