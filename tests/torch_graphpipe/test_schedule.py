import dataclasses

import pytest

from torch_graphpipe import Action, Schedule, ScheduleError, build_1f1b, validate_schedule

DIAMOND = [(0, 1), (0, 2), (1, 3), (2, 3)]


@pytest.mark.parametrize(
    "text", ["3F2", "0B0", "3SEND_F2>5", "5RECV_F2<3", "1SEND_B7>0", "0RECV_B7<1", "12F10", "3FL2", "3BL0"]
)
def test_action_round_trip(text):
    action = Action.parse(text)
    assert str(action) == text
    assert Action.parse(str(action)) == action


@pytest.mark.parametrize(
    "text", ["F2", "3X2", "3SEND_F2", "3F2>1", "3SEND_F2<1", "3RECV_B1>2", "2SEND_F1>2", "3FL2>1"]
)
def test_action_parse_rejects(text):
    with pytest.raises(ValueError):
        Action.parse(text)


@pytest.mark.parametrize(
    ("stages", "edges"),
    [(1, []), (4, [(0, 1), (1, 2), (2, 3)]), (4, DIAMOND), (5, [(0, 2), (1, 2), (2, 3), (0, 4)])],
)
@pytest.mark.parametrize("microbatches", [1, 3, 8])
def test_built_schedules_validate_and_round_trip(stages, edges, microbatches):
    schedule = build_1f1b(stages, edges, microbatches)
    validate_schedule(schedule)
    assert Schedule.parse(str(schedule)) == schedule


def test_warmup_is_longest_path_to_sink():
    schedule = build_1f1b(4, DIAMOND, 6)
    assert schedule.compute_order(0)[:4] == ["0F0", "0F1", "0F2", "0B0"]
    assert schedule.compute_order(1)[:3] == ["1F0", "1F1", "1B0"]
    assert schedule.compute_order(3)[:3] == ["3F0", "3B0", "3F1"]
    chain = build_1f1b(4, [(0, 1), (1, 2), (2, 3)], 8)
    assert chain.compute_order(0)[:5] == ["0F0", "0F1", "0F2", "0F3", "0B0"]


def test_sends_and_receives_name_peers_in_order():
    schedule = build_1f1b(4, DIAMOND, 2)
    prog = [str(a) for a in schedule.programs[3]]
    assert prog[:4] == ["3RECV_F0<1", "3RECV_F0<2", "3F0", "3B0"]
    assert prog[4:6] == ["3SEND_B0>1", "3SEND_B0>2"]


def _replace_program(schedule, stage, program):
    programs = list(schedule.programs)
    programs[stage] = tuple(Action.parse(t) if isinstance(t, str) else t for t in program)
    return dataclasses.replace(schedule, programs=tuple(programs))


def test_rejects_missing_backward():
    schedule = build_1f1b(2, [(0, 1)], 2)
    broken = _replace_program(schedule, 1, [a for a in schedule.programs[1] if str(a) != "1B1"])
    with pytest.raises(ScheduleError, match="no B for micro-batch 1"):
        validate_schedule(broken)


def test_rejects_backward_before_forward():
    broken = Schedule.parse("schedule stages=1 microbatches=1 edges=\n0: 0B0 0F0")
    with pytest.raises(ScheduleError, match="backward of micro-batch 0 comes before its forward"):
        validate_schedule(broken)


def test_rejects_unmatched_send():
    schedule = build_1f1b(2, [(0, 1)], 1)
    broken = _replace_program(schedule, 1, [a for a in schedule.programs[1] if str(a) != "1RECV_F0<0"])
    with pytest.raises(ScheduleError, match="1RECV_F0<0 appears 0 times, expected 1"):
        validate_schedule(broken)


def test_rejects_receive_after_compute():
    schedule = build_1f1b(2, [(0, 1)], 1)
    broken = _replace_program(schedule, 1, ["1F0", "1RECV_F0<0", "1B0", "1SEND_B0>0"])
    with pytest.raises(ScheduleError, match="must come before 1F0"):
        validate_schedule(broken)


def test_rejects_deadlock():
    schedule = build_1f1b(2, [(0, 1)], 2)
    # stage 0 waits for the gradient of micro-batch 0 before sending the activation of micro-batch 0
    broken = _replace_program(
        schedule, 0, ["0F0", "0RECV_B0<1", "0SEND_F0>1", "0B0", "0F1", "0SEND_F1>1", "0RECV_B1<1", "0B1"]
    )
    with pytest.raises(ScheduleError, match="deadlock"):
        validate_schedule(broken)


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="num_microbatches"):
        build_1f1b(2, [(0, 1)], 0)
    with pytest.raises(ValueError, match="num_stages"):
        build_1f1b(0, [], 2)


# -- stages split at a late input ([Note: late inputs]) --------------------------------------------


def test_split_stage_program_and_round_trip():
    schedule = build_1f1b(4, DIAMOND, 3, late=[(3, 2)])
    validate_schedule(schedule)
    assert Schedule.parse(str(schedule)) == schedule and "late=3<2" in str(schedule)
    prog = [str(a) for a in schedule.programs[3]]
    assert prog[:8] == ["3RECV_F0<1", "3F0", "3RECV_F0<2", "3FL0", "3BL0", "3SEND_B0>2", "3B0", "3SEND_B0>1"]
    assert schedule.late_pred(3) == 2 and schedule.late_pred(1) is None


def test_split_builder_rejects_a_late_input_that_is_not_an_edge():
    with pytest.raises(ValueError, match="late"):
        build_1f1b(4, DIAMOND, 2, late=[(3, 0)])
    with pytest.raises(ValueError, match="late"):
        build_1f1b(4, DIAMOND, 2, late=[(3, 1), (3, 2)])


def test_split_rejects_late_part_out_of_order():
    schedule = build_1f1b(4, DIAMOND, 1, late=[(3, 2)])
    prog = [str(a) for a in schedule.programs[3]]
    swapped = [*prog[:4], "3B0", "3SEND_B0>2", "3BL0", "3SEND_B0>1"]  # early backward before the late one
    with pytest.raises(ScheduleError, match="F, FL, BL, B in this order"):
        validate_schedule(_replace_program(schedule, 3, swapped))


def test_split_rejects_gradient_sent_to_late_peer_before_its_backward():
    schedule = build_1f1b(4, DIAMOND, 1, late=[(3, 2)])
    program = ["3RECV_F0<1", "3F0", "3RECV_F0<2", "3FL0", "3SEND_B0>2", "3BL0", "3B0", "3SEND_B0>1"]
    with pytest.raises(ScheduleError, match="3SEND_B0>2 must come after 3BL0"):
        validate_schedule(_replace_program(schedule, 3, program))


def test_split_actions_need_a_split_stage():
    schedule = build_1f1b(4, DIAMOND, 1)
    prog = [str(a) for a in schedule.programs[3]]
    with pytest.raises(ScheduleError, match="not split"):
        validate_schedule(_replace_program(schedule, 3, [*prog[:3], "3FL0", *prog[3:]]))
    with pytest.raises(ScheduleError, match="not a stage edge"):
        validate_schedule(dataclasses.replace(schedule, late=((3, 0),)))
