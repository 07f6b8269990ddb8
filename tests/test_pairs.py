"""Pair building (Silkie combinations, filters, caps, report) and the prompt-level split."""

from __future__ import annotations

from itertools import combinations

import pytest

from silkie.data.pairs import PreferencePair, build_vlfeedback_pairs, pairs_from_preference_rows
from silkie.data.sources import normalize_feedback_row
from silkie.data.split import split_by_prompt
from silkie.errors import InputError
from tests.data_fixtures import clean_row, feedback_row, to_columnar


def _texts(pairs):
    return [(p.chosen, p.rejected) for p in pairs]


def test_clean_prompt_gives_six_pairs_chosen_higher():
    pairs, report = build_vlfeedback_pairs([clean_row("a"), clean_row("b")])
    assert len(pairs) == 12 and report.pairs_kept == 12 and report.rows_kept == 2
    first = [p for p in pairs if p.prompt_id == "a"]
    assert _texts(first)[0] == ("answer 0 of a", "answer 1 of a")
    assert {p.margin for p in first} == {1.0, 2.0, 3.0}
    assert all(p.chosen_score > p.rejected_score for p in pairs)
    assert first[0].images == ("merged_images/a.jpg",) and first[0].prompt == "Describe the image."
    assert sum(report.pairs_dropped.values()) == 0


def test_ties_are_dropped():
    row = feedback_row("t", [(5, 5, 5), (5, 5, 5), (3, 3, 3), (1, 1, 1)])
    pairs, report = build_vlfeedback_pairs([row])
    assert len(pairs) == 5
    assert report.pairs_dropped == {"tie": 1}
    assert report.offending_ids["tie"] == ["t"]


def test_non_numeric_rating_drops_pairs_of_that_answer():
    row = feedback_row("na", [("N/A", 5, 5), (4, 4, 4), (3, 3, 3), (2, 2, 2)])
    pairs, report = build_vlfeedback_pairs([row])
    assert len(pairs) == 3 and report.pairs_dropped == {"non_numeric_rating": 3}
    assert all("answer 0" not in p.chosen + p.rejected for p in pairs)
    # Only weighted aspects matter: with Visual Faithfulness alone the N/A helpfulness is ignored.
    pairs_vf, report_vf = build_vlfeedback_pairs([row], aspect_weights={"Visual Faithfulness": 1.0})
    assert len(pairs_vf) == 6 and not report_vf.pairs_dropped


def test_empty_answer_and_missing_rating():
    row = feedback_row("e", [(5, 5, 5), (4, 4, 4), (3, 3, 3), (2, 2, 2)])
    row["completions"][1]["response"] = "   "
    del row["completions"][2]["annotations"]["Helpfulness"]
    pairs, report = build_vlfeedback_pairs([row])
    assert report.pairs_dropped == {"empty_answer": 3, "missing_rating": 2}
    assert _texts(pairs) == [("answer 0 of e", "answer 3 of e")]


def test_min_margin():
    pairs, report = build_vlfeedback_pairs([clean_row("m")], min_margin=2.0)
    assert sorted(p.margin for p in pairs) == [2.0, 2.0, 3.0]
    assert report.pairs_dropped == {"below_margin": 3}


def test_aspect_weights_change_survivors_and_scores():
    # means: A 3.67, B 2.33, C 3.0, D 2.33 ; visual faithfulness: A 1, B 5, C 3, D 3
    row = feedback_row("w", [(5, 5, 1), (1, 1, 5), (3, 3, 3), (2, 2, 3)])
    mean_pairs, mean_report = build_vlfeedback_pairs([row])
    vf_pairs, vf_report = build_vlfeedback_pairs([row], aspect_weights={"Visual Faithfulness": 2.0})
    assert mean_report.pairs_dropped == {"tie": 1} and vf_report.pairs_dropped == {"tie": 1}
    assert ("answer 0 of w", "answer 1 of w") in _texts(mean_pairs)
    assert ("answer 1 of w", "answer 0 of w") in _texts(vf_pairs)
    assert ("answer 2 of w", "answer 3 of w") in _texts(mean_pairs)
    assert ("answer 2 of w", "answer 3 of w") not in _texts(vf_pairs)  # C and D tie on faithfulness
    vf = {(p.chosen, p.rejected): (p.chosen_score, p.rejected_score) for p in vf_pairs}
    assert vf[("answer 1 of w", "answer 0 of w")] == (5.0, 1.0)
    mean = {(p.chosen, p.rejected): p.chosen_score for p in mean_pairs}
    assert mean[("answer 0 of w", "answer 1 of w")] == pytest.approx(11 / 3)
    with pytest.raises(ValueError):
        build_vlfeedback_pairs([row], aspect_weights={"Helpfulness": 0.0})
    with pytest.raises(InputError) as typo:  # it named neither the aspect nor the rated ones (missing_rating: 6)
        build_vlfeedback_pairs([row], aspect_weights={"Helpfullness": 2.0, "Visual Faithfulness": 1.0})
    assert str(typo.value) == (
        "data.aspect_weights names 'Helpfullness', which no row of rows rates (they rate 'Ethical Considerations', "
        "'Helpfulness', 'Visual Faithfulness'): every pair lacked that rating"
    )


def test_cap_by_margin_is_highest_first_and_stable():
    pairs, report = build_vlfeedback_pairs([clean_row("c")], max_pairs_per_prompt=3)
    assert [p.margin for p in pairs] == [3.0, 2.0, 2.0]
    # equal margins keep combination order: (0,2) before (1,3)
    assert _texts(pairs)[1:] == [("answer 0 of c", "answer 2 of c"), ("answer 1 of c", "answer 3 of c")]
    assert report.pairs_dropped == {"over_cap": 3} and report.pairs_kept == 3


def test_cap_random_is_seeded_and_deterministic():
    rows = [clean_row(f"r{i}") for i in range(8)]
    full = set(_texts(build_vlfeedback_pairs(rows)[0]))
    first = build_vlfeedback_pairs(rows, max_pairs_per_prompt=2, cap_strategy="random", seed=1)[0]
    again = build_vlfeedback_pairs(rows, max_pairs_per_prompt=2, cap_strategy="random", seed=1)[0]
    other = build_vlfeedback_pairs(rows, max_pairs_per_prompt=2, cap_strategy="random", seed=2)[0]
    assert first == again and len(first) == 16
    assert set(_texts(first)) <= full
    assert _texts(first) != _texts(other)
    with pytest.raises(ValueError):
        build_vlfeedback_pairs(rows, cap_strategy="longest")


def test_report_counts_and_first_offending_ids():
    rows = [feedback_row(f"tie{i}", [(5, 5, 5), (5, 5, 5)]) for i in range(7)]
    rows += [clean_row("ok"), {"id": "noprompt", "completions": []}, "not a row"]
    pairs, report = build_vlfeedback_pairs(rows, source="fixture")
    assert len(pairs) == 6
    assert report.rows_seen == 10 and report.rows_kept == 1
    assert report.rows_dropped == {"no_usable_pairs": 7, "missing_field": 1, "wrong_type": 1}
    assert report.offending_ids["tie"] == ["tie0", "tie1", "tie2", "tie3", "tie4"]
    assert report.offending_ids["missing_field"] == ["noprompt"]
    assert report.pairs_dropped == {"tie": 7}
    summary = report.summary()
    assert "\n" not in summary and "fixture" in summary and "tie: 7 (first: tie0)" in summary
    # the first case of each reason names its row and what was wrong with it
    assert (
        "missing_field: 1 (first: noprompt: prompt)" in summary
        and "wrong_type: 1 (first: row 9: row is str)" in summary
    )
    assert report.as_dict()["rows_dropped"]["no_usable_pairs"] == 7


def test_zero_usable_pairs_raises_naming_source():
    with pytest.raises(ValueError, match="my-source"):
        build_vlfeedback_pairs([feedback_row("x", [(3, 3, 3), (3, 3, 3)])], source="my-source")


def test_columnar_and_row_layouts_give_identical_pairs():
    rows = [clean_row("a"), feedback_row("b", [(1, 2, 3), (3, 2, 1), (5, 4, 5), ("N/A", 1, 1)])]
    by_rows = build_vlfeedback_pairs(rows)
    by_columns = build_vlfeedback_pairs([to_columnar(r) for r in rows])
    assert by_rows[0] == by_columns[0]
    assert by_rows[1].as_dict() == by_columns[1].as_dict()
    assert normalize_feedback_row(rows[1]) == normalize_feedback_row(to_columnar(rows[1]))


def test_img_path_resolves_to_merged_images_key():
    plain = normalize_feedback_row(clean_row("p") | {"img_path": "p.jpg"})
    nested = normalize_feedback_row(clean_row("q") | {"img_path": "./data/merged_images/q.jpg"})
    assert plain.images == ("merged_images/p.jpg",) and nested.images == ("merged_images/q.jpg",)


def test_pairs_from_preference_rows():
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad", "image": "x.jpg"},
        {"id": "2", "prompt": "Q2", "chosen": "same", "rejected": "same"},
        {"id": 3, "prompt": "Q3", "chosen": "", "rejected": "bad"},
        {"id": "4", "prompt": "Q4", "chosen": "a", "rejected": "b", "chosen_score": 4, "rejected_score": "2.5"},
    ]
    pairs, report = pairs_from_preference_rows(rows)
    assert [p.prompt_id for p in pairs][1] == "4" and pairs[0].prompt_id.startswith("pref-")
    assert pairs[0].images == ("x.jpg",) and (pairs[0].chosen_score, pairs[0].rejected_score) == (1.0, 0.0)
    assert pairs[1].margin == 1.5
    assert report.pairs_dropped == {"identical_answers": 1, "empty_answer": 1}
    assert report.offending_ids["empty_answer"] == ["3"]


def _pairs_for(ids):
    return [PreferencePair(pid, f"p-{pid}", None, f"c{k}", f"r{k}", 1.0, 0.0) for pid in ids for k in range(2)]


def test_split_by_prompt_no_shared_ids_and_deterministic():
    pairs = _pairs_for([f"id{i}" for i in range(50)])
    train, evaluation = split_by_prompt(pairs, eval_fraction=0.2, seed=3)
    assert len(evaluation) == 20 and len(train) == 80
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in evaluation}
    assert split_by_prompt(list(reversed(pairs)), eval_fraction=0.2, seed=3)[1] == list(reversed(evaluation))
    assert split_by_prompt(pairs, eval_fraction=0.2, seed=4)[1] != evaluation
    by_size = split_by_prompt(pairs, eval_size=5, seed=3)[1]
    assert len({p.prompt_id for p in by_size}) == 5
    assert split_by_prompt(pairs) == (pairs, [])
    assert len(split_by_prompt(pairs, eval_fraction=0.001)[1]) == 2  # at least one prompt
    with pytest.raises(ValueError):
        split_by_prompt(pairs, eval_size=50)
    with pytest.raises(ValueError):
        split_by_prompt(pairs, eval_fraction=0.1, eval_size=3)


def test_a_hashed_split_keeps_each_prompt_s_side_whatever_else_the_data_holds():
    # annotate rounds: a round whose usable prompts differ must not hold out a prompt an earlier round trained on
    pairs = _pairs_for([f"id{i}" for i in range(200)])
    held = {p.prompt_id for p in split_by_prompt(pairs, eval_fraction=0.2, seed=3, rule="hashed")[1]}
    assert 20 < len(held) < 60  # about 40 of 200: the count is not exact
    ranked = {p.prompt_id for p in split_by_prompt(pairs, eval_fraction=0.2, seed=3)[1]}
    gone = set(sorted(ranked)[:20]) | set(sorted(held)[:5])  # held-out prompts leave the data
    fewer = [p for p in pairs if p.prompt_id not in gone]
    train, evaluation = split_by_prompt(fewer, eval_fraction=0.2, seed=3, rule="hashed")
    assert {p.prompt_id for p in evaluation} == held & {p.prompt_id for p in fewer}
    assert not {p.prompt_id for p in train} & held
    moved = {p.prompt_id for p in split_by_prompt(fewer, eval_fraction=0.2, seed=3)[1]} - ranked
    assert moved  # the ranked rule refills the count from prompts that were on the training side
    # a prompt is drawn once whatever ids its pairs carry (a file giving each pair its own id, a release adding pairs)
    own_ids = [PreferencePair(f"{p.prompt_id}-{k}", p.prompt, None, p.chosen, p.rejected, 1.0, 0.0)
               for k, p in enumerate(pairs)]  # fmt: skip
    assert {p.prompt for p in split_by_prompt(own_ids, eval_fraction=0.2, seed=3, rule="hashed")[1]} == {
        p.prompt for p in pairs if p.prompt_id in held
    }
    with pytest.raises(ValueError, match="data.eval_split hashed held out no prompt of 2 at data.eval_fraction 1e-09"):
        split_by_prompt(_pairs_for(["a", "b"]), eval_fraction=1e-9, seed=0, rule="hashed")


def test_split_keeps_a_prompt_together_when_each_pair_has_its_own_id():
    """Preference files often give every pair its own id: the split still goes by question + image."""
    pairs = [
        PreferencePair(f"q{q}-p{k}", f"question {q % 10}", f"img{q}.jpg", f"c{k}", f"r{k}", 1.0, 0.0)
        for q in range(20)
        for k in range(3)
    ]
    train, evaluation = split_by_prompt(pairs, eval_fraction=0.2, seed=0)
    prompts = {(p.prompt, p.images) for p in evaluation}
    assert len(prompts) == 4 and len(evaluation) == 12  # 4 of 20 prompts, all 3 pairs of each
    assert not prompts & {(p.prompt, p.images) for p in train}


def test_a_long_bad_value_is_cut_in_the_summary():
    """A shifted column can put a whole answer where a score belongs: the summary line stays short."""
    rows = [{"id": "r", "prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": "x" * 3000}]
    pairs, report = pairs_from_preference_rows([*rows, {"id": "ok", "prompt": "p", "chosen": "a", "rejected": "b"}])
    assert len(pairs) == 1 and report.rows_dropped == {"wrong_type": 1}
    assert len(report.summary()) < 300 and "(first: r: chosen_score='xxx" in report.summary()


def test_vlfeedback_rows_reusing_an_id_are_reported_and_skipped():
    """The image of a release row is found by its id and its pairs are capped per id: a second row with that id
    (another prompt, or a copy) would train against the first row's image or double its pairs past the cap."""
    reused = clean_row("a")
    reused["prompt"] = "Another question."
    rows = [clean_row("a"), clean_row("b"), reused, clean_row("a"), clean_row("c")]
    pairs, report = build_vlfeedback_pairs(rows, max_pairs_per_prompt=2)
    assert report.rows_dropped == {"reused_id": 1, "duplicate_row": 1}
    assert (report.rows_seen, report.rows_kept, report.pairs_kept) == (5, 3, 6)
    assert [p.prompt_id for p in pairs].count("a") == 2  # capped once, not twice
    assert all(p.prompt == "Describe the image." for p in pairs)
    assert "reused_id: 1 (first: a: the id of an earlier row with another prompt or answers)" in report.summary()
    assert "duplicate_row: 1 (first: a: a copy of an earlier row)" in report.summary()


def test_a_rating_outside_the_1_to_5_scale_drops_the_pairs_of_that_answer():
    row = feedback_row("big", [(9999, 5, 5), (4, 4, 4), (3, 3, 3), (0, 2, 2)])
    pairs, report = build_vlfeedback_pairs([row])
    assert report.pairs_dropped == {"rating_out_of_range": 5}  # every pair with answer 0 or answer 3
    assert _texts(pairs) == [("answer 1 of big", "answer 2 of big")]
    # a pair of one out-of-range and one non-numeric answer counts as non-numeric (the first problem of the two)
    mixed = feedback_row("mix", [(9999, 5, 5), ("N/A", 4, 4), (3, 3, 3), (2, 2, 2)])
    _, mixed_report = build_vlfeedback_pairs([mixed])
    assert mixed_report.pairs_dropped == {"non_numeric_rating": 3, "rating_out_of_range": 2}


def test_an_exact_copy_of_a_preference_row_is_a_counted_drop():
    row = {"id": "p", "prompt": "Q?", "chosen": "yes", "rejected": "no"}
    other = {"id": "p", "prompt": "Q?", "chosen": "yes!", "rejected": "no"}  # a second pair of the same prompt
    pairs, report = pairs_from_preference_rows([row, dict(row), other])
    assert len(pairs) == 2 and report.rows_dropped == {"duplicate_row": 1}


def _repository_pairs(row):
    """The Silkie repository's run_dpo.make_batch_pairs on one row, written out: mean of the aspects present,
    a pair skipped on a non-numeric rating or a tie, nothing else checked."""
    out = []
    completions = row["completions"]
    for i, j in combinations(range(len(completions)), 2):
        scores = []
        for completion in (completions[i], completions[j]):
            ratings = completion["annotations"].values()
            try:
                scores.append(sum(float(r["Rating"]) for r in ratings) / len(ratings))
            except ValueError:
                break
        if len(scores) < 2 or scores[0] == scores[1]:
            continue
        win, lose = (i, j) if scores[0] > scores[1] else (j, i)
        out.append((completions[win]["response"], completions[lose]["response"]))
    return out


def test_original_rating_rules_give_the_repository_pairs():
    row = feedback_row("o", [(5, 4, 4), (4, 4, 4), (3, 3, 3), (2, 2, 2), (4, 4, "N/A"), (7, 3, 2), (1, 1, 1)])
    del row["completions"][1]["annotations"]["Helpfulness"]  # mean of the two present: 4.0
    row["completions"][2]["response"] = ""  # an empty answer is kept
    row["completions"][6]["response"] = row["completions"][3]["response"]  # the same text as another answer
    pairs, report = build_vlfeedback_pairs([row], rating_rules="original")
    assert _texts(pairs) == _repository_pairs(row)
    # means 4.33, 4.0, 3.0, 2.0, N/A, 4.0 (a 7 kept), 1.0: the N/A answer's 6 pairs and 1 tie are skipped
    assert report.pairs_dropped == {"non_numeric_rating": 6, "tie": 1}
    assert len(pairs) == 21 - 7 and ("answer 3 of o", "answer 3 of o") in _texts(pairs)
    with pytest.raises(ValueError, match="aspect weights need rating_rules 'checked'"):
        build_vlfeedback_pairs([row], rating_rules="original", aspect_weights={"Helpfulness": 1.0})
    checked, checked_report = build_vlfeedback_pairs([row])
    assert len(checked) < len(pairs) and {"missing_rating", "empty_answer", "rating_out_of_range"} <= set(
        checked_report.pairs_dropped
    )
