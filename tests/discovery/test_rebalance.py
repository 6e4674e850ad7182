"""discovery.rebalance.rebalance: the fair-share rules after every step of random join/leave sequences, and the
fewest moves the rules allow."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.rebalance import rebalance
from discovery.share import fair_share, moved_assignments

from .test_share import check_rules, students, teachers


def test_nothing_to_keep_gives_fair_share():
    s, t = students(5), teachers(12)
    assert rebalance({}, s, t, 3) == fair_share(s, t, 3)
    assert rebalance({"gone": t[:2], s[0]: ["10.9.9.9:1"]}, s, t, 3) == fair_share(s, t, 3)
    assert rebalance({s[0]: t[:2]}, s, [], 3) == {x: [] for x in s}


def test_every_still_valid_pair_is_kept_when_the_rules_allow():
    s, t = students(3), teachers(6)
    previous = {s[0]: [t[0], t[1]], s[1]: [t[2], t[3]], s[2]: [t[4], t[5]]}
    assert rebalance(previous, s, t, 2) == previous
    assert rebalance(previous, s, list(reversed(t)) + t[:2], 2) == previous      # order, duplicates: no matter


def test_a_leaving_teacher_costs_only_its_own_pairs_at_full_load():
    s, t = students(100), teachers(400)
    before = rebalance({}, s, t, 4)
    gone = t[17]
    after = rebalance(before, s, t[:17] + t[18:], 4)
    check_rules(after, s, t[:17] + t[18:], 4)
    assert moved_assignments(before, after) == 1
    (user,) = [x for x in s if gone in before[x]]
    assert [x for x in s if after[x] != before[x]] == [user]
    assert set(before[user]) - {gone} <= set(after[user])


def test_a_student_joining_or_leaving_at_full_load_moves_nobody():
    s, t = students(100), teachers(400)
    before = rebalance({}, s, t, 4)
    newcomer = "student-9999999999"
    joined = rebalance(before, s + [newcomer], t, 4)
    check_rules(joined, s + [newcomer], t, 4)
    assert moved_assignments(before, joined) == 0
    left = rebalance(before, s[:40] + s[41:], t, 4)
    assert moved_assignments(before, left) == 0


def test_a_student_wanting_fewer_keeps_some_of_its_teachers_and_garbage_is_ignored():
    s, t = students(2), teachers(4)
    previous = {s[0]: [t[0], t[1], t[1], "nope:1", 7], s[1]: "10.0.0.2:9292"}   # repeats, strangers, a string
    after = rebalance(previous, s, t, {s[0]: 1, s[1]: 2})
    check_rules(after, s, t, {s[0]: 1, s[1]: 2})
    assert after[s[0]][0] in (t[0], t[1])


def test_scarce_teachers_give_every_student_all_of_them():
    s, t = students(6), teachers(3)
    before = rebalance({}, s, t, 4)
    after = rebalance(before, s, t[:2], 4)
    check_rules(after, s, t[:2], 4)
    assert all(sorted(after[x]) == sorted(t[:2]) for x in s)


def run_sequence(rng, n_students, n_teachers, steps, wanted_range=(4, 4)):
    """Random joins and leaves; rules checked after each; returns {kind: [moves, ...]}."""
    s, t = students(n_students), teachers(n_teachers)
    wanted = {x: rng.randint(*wanted_range) for x in s}
    assignment = rebalance({}, s, t, wanted)
    moves = {"teacher joins": [], "teacher leaves": [], "student joins": [], "student leaves": []}
    serial = n_students
    for step in range(steps):
        kind = rng.choice(list(moves))
        if kind == "teacher joins" or (kind == "teacher leaves" and len(t) < 2):
            kind, t = "teacher joins", t + [f"10.1.{step // 250}.{step % 250}:9292"]
        elif kind == "teacher leaves":
            gone = rng.choice(t)
            t = [x for x in t if x != gone]
        elif kind == "student joins" or len(s) < 2:
            kind, s = "student joins", s + [f"student-{serial:010d}"]
            wanted[s[-1]] = rng.randint(*wanted_range)
            serial += 1
        else:
            gone = rng.choice(s)
            s = [x for x in s if x != gone]
        after = rebalance(assignment, s, t, wanted)
        check_rules(after, s, t, wanted)
        assert after == rebalance(assignment, s, list(reversed(t)), wanted)     # deterministic
        moves[kind].append(moved_assignments(assignment, after))
        assignment = after
    return moves


@pytest.mark.parametrize("n_students,n_teachers", [(10, 40), (30, 120), (100, 400), (100, 200), (50, 400),
                                                   (20, 10), (5, 3)])
def test_random_sequences_keep_the_rules_and_move_at_most_two_pairs_per_change_on_average(n_students, n_teachers):
    moves = run_sequence(random.Random(n_students * 7 + n_teachers), n_students, n_teachers, steps=160)
    load = 4 * n_students / n_teachers                       # students per teacher
    for kind in ("teacher joins", "teacher leaves"):
        if moves[kind]:
            # a leaving teacher's own pairs (ceil(load)) must move, a joining one takes floor(load): no better exists
            assert sum(moves[kind]) / len(moves[kind]) <= max(2, -(-load // 1)), (kind, moves[kind])
    student_changes = moves["student joins"] + moves["student leaves"]
    assert sum(moves["student joins"]) == 0
    # a join overloads its 4 teachers by one, so a later leave may have to move up to 4: 2 per change on average
    assert sum(student_changes) / len(student_changes) <= 2, student_changes


def test_full_load_teacher_changes_move_one_pair():
    moves = run_sequence(random.Random(5), 100, 400, steps=200)
    assert max(moves["teacher leaves"]) <= 2 and sum(moves["teacher leaves"]) / len(moves["teacher leaves"]) <= 1.2
    assert max(moves["teacher joins"]) <= 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(students(12)), unique=True, max_size=12),
       st.lists(st.sampled_from(teachers(20)), max_size=20),
       st.dictionaries(st.sampled_from(students(14)), st.lists(st.sampled_from(teachers(22)), max_size=8)),
       st.dictionaries(st.sampled_from(students(12)), st.integers(1, 6)))
def test_any_previous_assignment_gives_a_valid_one(s, t, previous, wanted):
    after = rebalance(previous, s, t, wanted)
    check_rules(after, s, t, {x: wanted.get(x, 1) for x in s})
    assert rebalance(after, s, t, wanted) == after                 # a valid assignment is a fixed point


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="duplicate student ids"):
        rebalance({}, ["a", "a"], teachers(2), 1)
    with pytest.raises(ValueError, match="require_max for student 'a'"):
        rebalance({"a": teachers(1)}, ["a"], teachers(2), 0)
