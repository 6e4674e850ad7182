"""discovery.share.fair_share: the fair-share rules, checked exhaustively on small cases and on examples."""
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.share import fair_share, moved_assignments, teacher_loads


def students(n):
    return [f"student-{i:010d}" for i in range(n)]


def teachers(n):
    return [f"10.0.0.{i}:9292" for i in range(n)]


def check_rules(assignment, student_ids, teacher_ids, wanted):
    assert list(assignment) == list(student_ids)
    for student, chosen in assignment.items():
        m = wanted[student] if isinstance(wanted, dict) else wanted
        assert len(chosen) == min(m, len(set(teacher_ids))), (student, chosen)
        assert len(set(chosen)) == len(chosen)
        assert set(chosen) <= set(teacher_ids)
    loads = teacher_loads(assignment, teacher_ids)
    if loads:
        assert max(loads.values()) - min(loads.values()) <= 1, loads


@pytest.mark.parametrize("n_students,n_teachers,m", list(itertools.product(range(0, 7), range(0, 8), range(1, 5))))
def test_rules_hold_for_every_small_case(n_students, n_teachers, m):
    s, t = students(n_students), teachers(n_teachers)
    check_rules(fair_share(s, t, m), s, t, m)


def test_rules_hold_with_a_different_maximum_per_student():
    rng = random.Random(7)
    for _ in range(300):
        s, t = students(rng.randint(1, 8)), teachers(rng.randint(0, 12))
        wanted = {student: rng.randint(1, 5) for student in s}
        check_rules(fair_share(s, t, wanted), s, t, wanted)


def test_three_students_six_teachers_two_each_use_every_teacher_once():
    s, t = students(3), teachers(6)
    assignment = fair_share(s, t, 2)
    assert sorted(x for chosen in assignment.values() for x in chosen) == sorted(t)
    assert teacher_loads(assignment, t) == {teacher: 1 for teacher in t}


def test_when_a_student_leaves_with_room_to_grow_the_others_take_its_teachers():
    s, t = students(3), teachers(6)
    before = fair_share(s, t, 3)          # 9 places on 6 teachers: three teachers serve two students
    assert sorted(teacher_loads(before, t).values()) == [1, 1, 1, 2, 2, 2]
    after = fair_share([s[0], s[2]], t, 3)
    assert sorted(after[s[0]] + after[s[2]]) == sorted(t)     # now every teacher serves exactly one student
    assert after[s[0]] == before[s[0]]                         # the oldest keeps what it had
    only_departed = set(before[s[1]]) - set(before[s[0]]) - set(before[s[2]])
    assert only_departed and only_departed <= set(after[s[2]])  # what only the leaver used went to the other


def test_more_students_than_teachers_share_them_evenly():
    s, t = students(5), teachers(2)
    assignment = fair_share(s, t, 1)
    assert sorted(teacher_loads(assignment, t).values()) == [2, 3]
    assert all(len(chosen) == 1 for chosen in assignment.values())


def test_deterministic_and_independent_of_teacher_order_and_duplicates():
    s, t = students(4), teachers(9)
    first = fair_share(s, t, 2)
    shuffled = list(t) + t[:3]
    random.Random(1).shuffle(shuffled)
    assert fair_share(s, shuffled, 2) == first
    assert fair_share(list(s), list(t), 2) == first


def test_a_leaving_student_never_moves_the_teachers_of_older_students():
    rng = random.Random(3)
    for _ in range(200):
        s, t, m = students(rng.randint(2, 7)), teachers(rng.randint(1, 10)), rng.randint(1, 3)
        before = fair_share(s, t, m)
        leaving = rng.randrange(len(s))
        after = fair_share(s[:leaving] + s[leaving + 1:], t, m)
        for older in s[:leaving]:
            assert after[older] == before[older]


# -- property tests over random views ---------------------------------------------------------------------
names = st.text(alphabet="abcdefghij0123456789.:-", min_size=1, max_size=12)


@st.composite
def views(draw, max_students=24, max_teachers=40):
    """(students in join order, teachers, require_max per student) of a random ZooKeeper view."""
    student_ids = draw(st.lists(names, max_size=max_students, unique=True))
    teacher_ids = draw(st.lists(names, max_size=max_teachers))
    wanted = {s: draw(st.integers(1, 6)) for s in student_ids}
    return student_ids, teacher_ids, wanted


@settings(max_examples=400, deadline=None)
@given(views(), st.randoms(use_true_random=False))
def test_rules_hold_and_the_answer_depends_only_on_the_view(view, rng):
    s, t, wanted = view
    assignment = fair_share(s, t, wanted)
    check_rules(assignment, s, t, wanted)
    shuffled = list(t) + t[: len(t) // 3]
    rng.shuffle(shuffled)
    assert fair_share(s, shuffled, wanted) == assignment          # teacher order and duplicates do not matter
    assert fair_share(s, t, dict(reversed(list(wanted.items())))) == assignment


@settings(max_examples=300, deadline=None)
@given(views(), st.data())
def test_churn_a_student_joining_moves_nobody_and_one_leaving_moves_no_older_student(view, data):
    s, t, wanted = view
    before = fair_share(s, t, wanted)
    newcomer = data.draw(names.filter(lambda name: name not in wanted))
    joined = fair_share(s + [newcomer], t, dict(wanted, **{newcomer: data.draw(st.integers(1, 6))}))
    assert moved_assignments(before, joined) == 0
    assert all(joined[x] == before[x] for x in s)
    if s:
        leaving = data.draw(st.integers(0, len(s) - 1))
        after = fair_share(s[:leaving] + s[leaving + 1:], t, wanted)
        check_rules(after, s[:leaving] + s[leaving + 1:], t, wanted)
        for older in s[:leaving]:
            assert after[older] == before[older]


@settings(max_examples=300, deadline=None)
@given(views(), st.data())
def test_churn_teachers_joining_or_leaving_keep_the_rules_and_a_join_moves_no_student_before_its_first_user(
        view, data):
    s, t, wanted = view
    before = fair_share(s, t, wanted)
    if t:
        gone = data.draw(st.sampled_from(sorted(set(t))))
        left = [x for x in t if x != gone]
        check_rules(fair_share(s, left, wanted), s, left, wanted)
    newcomer = data.draw(names.filter(lambda name: name not in t))
    after = fair_share(s, t + [newcomer], wanted)
    check_rules(after, s, t + [newcomer], wanted)
    first_user = next((i for i, x in enumerate(s) if newcomer in after[x]), len(s))
    for older in s[:first_user]:
        assert after[older] == before[older]


def test_a_new_teacher_moves_few_assignments():
    s, t = students(4), teachers(8)
    before = fair_share(s, t, 2)
    after = fair_share(s, t + ["10.0.0.99:9292"], 2)
    moved = sum(len(set(before[x]) - set(after[x])) for x in s)
    assert moved <= 4   # at most half of the 8 assignments change


def test_no_teachers_gives_every_student_an_empty_list():
    assert fair_share(students(2), [], 3) == {students(2)[0]: [], students(2)[1]: []}
    assert fair_share([], teachers(3), 1) == {}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_maximum_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="require_max for student 'student-0000000000'"):
        fair_share(students(1), teachers(2), bad)


def test_duplicate_students_are_an_error():
    with pytest.raises(ValueError, match="duplicate student ids"):
        fair_share(["a", "a"], teachers(2), 1)
