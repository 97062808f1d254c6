"""Tests for coffee.py. Both Temporal servers come from requirements.txt; nothing is started by hand.

Retries and back-offs run on the time-skipping test server; what needs real timing
(a query mid-brew, a cancel that reaches a running brew, the CLI) runs on a dev server.
pytest-xdist runs the tests in five processes (.pytest.ini), each with one server of each kind.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError
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
    BrewMachineJammed,
    CoffeeActivities,
    Drink,
    OrderCoffeeWorkflow,
    OrderRequest,
    OrderResult,
    OrderStatus,
    Receipt,
    ServiceFactory,
    ServiceSettings,
    Size,
    StandardPricingStrategy,
)

# Async tests share one event loop, so that they can share the session's servers.
on_session_loop = pytest.mark.asyncio(loop_scope="session")

COFFEE_PY = str(Path(__file__).with_name("coffee.py"))
LATTE_M = dict(drink=Drink.LATTE, size=Size.M)


async def start_dev_server() -> WorkflowEnvironment:
    """A dev server from the venv's `temporal` binary, quiet but for errors."""
    return await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=coffee.find_binary("temporal"),
        dev_server_log_level="error",
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    async with await start_dev_server() as env:
        yield env


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=coffee.find_binary("temporal-test-server"),
    )
    async with env:
        yield env


def new_order(drink: Drink = Drink.LATTE, size: Size = Size.M) -> OrderRequest:
    return OrderRequest(order_id=f"t-{uuid.uuid4().hex[:12]}", drink=drink, size=size)


def settings(**overrides: Any) -> ServiceSettings:
    """Instant brews that never jam, unless a test says otherwise."""
    return ServiceSettings(brew_failure_rate=0.0, brew_seconds=0.0)._replace(**overrides)


@asynccontextmanager
async def worker(client: Client, services: ServiceFactory, task_queue: str | None = None) -> AsyncIterator[str]:
    """A worker on a fresh task queue, so that no test sees another's orders."""
    queue = task_queue or f"test-{uuid.uuid4()}"
    async with coffee.new_worker(client, services, task_queue=queue):
        yield queue


async def start(client: Client, order: OrderRequest, queue: str) -> WorkflowHandle[OrderCoffeeWorkflow, OrderResult]:
    workflow_id = coffee.workflow_id_for(order.order_id)
    return await client.start_workflow(OrderCoffeeWorkflow.run, order, id=workflow_id, task_queue=queue)


def ledger(services: ServiceFactory, order: OrderRequest | None = None) -> list[tuple[str, int]]:
    """The money moved, for one order or for all."""
    return [(e.kind, e.amount_cents) for e in services.payment.ledger if order is None or e.order_id == order.order_id]


async def wait_for_status(handle: WorkflowHandle[OrderCoffeeWorkflow, OrderResult], status: OrderStatus) -> None:
    async with asyncio.timeout(10):
        while (await handle.query(OrderCoffeeWorkflow.get_status)).status != status:
            await asyncio.sleep(0.05)


SPAWNED: list[asyncio.subprocess.Process] = []


async def spawn(*args: str, address: str, **environment: str) -> asyncio.subprocess.Process:
    """Start coffee.py as a user would, against the server at this address, its output piped to the test."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        COFFEE_PY,
        *args,
        env={**os.environ, "TEMPORAL_ADDRESS": address, **environment},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    SPAWNED.append(process)
    return process


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def no_process_left_behind() -> AsyncIterator[None]:
    """A process that a test started and, failing early, did not end, ends with the test."""
    yield
    while SPAWNED:
        process = SPAWNED.pop()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def run_cli(*args: str, address: str, **environment: str) -> tuple[int, str, str]:
    process = await spawn(*args, address=address, **environment)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def dev_address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


def completed_latte(order_id: str) -> OrderResult:
    """The seed's result for a medium latte that went well: charged 450 + 75 = 525 cents, brewed, receipt sent."""
    return OrderResult(
        order_id=order_id,
        status=OrderStatus.COMPLETED,
        charged=True,
        brewed=True,
        receipt_sent=True,
        amount_cents=525,
        refunded=False,
    )


# --- The slowest tests, first: they wait on real time, and pytest-xdist (see .pytest.ini) starts them at once,
# one per worker, while the quick ones fill in around them ---


@on_session_loop
async def test_demo_runs_three_orders_on_its_own_server_and_leaves_none_behind(
    dev_server: WorkflowEnvironment,
) -> None:
    code, out, err = await run_cli("demo", address="127.0.0.1:1")
    output = out + err
    assert code == 0, output
    assert "Traceback" not in output and "WARN" not in output  # the narration and the seed's log lines, nothing else
    assert "No Temporal server answered at 127.0.0.1:1, so the demo starts its own" in output
    assert "Brew machine jammed for order latte-" in output
    assert '"status":"COMPLETED"' in output and '"amount_cents":525' in output
    assert "payment ledger: charge 525\n" in output
    assert "get_status: BREWING" in output and '"amount_cents":650' in output
    assert '"status":"CANCELLED"' in output and '"refunded":true' in output
    assert "Brew stopped for order espresso-" in output
    assert "payment ledger: charge 350, refund 350\n" in output
    assert "/namespaces/default/workflows/order-latte-" in output  # each order's link in the web UI
    # Where the time went: brewing (latte 1.25 s to the jam + 2.5 s, mocha 2.5 s, espresso 1 s or more), 1 s back-off.
    took, waited, brewing, back_off, other = map(float, re.findall(r"(\d+\.\d) s", output.split("Demo took ")[1]))
    assert brewing >= 7.25 and back_off == 1.0 and waited == pytest.approx(brewing + back_off, abs=0.11)
    assert other == pytest.approx(took - waited) and other > 0
    ui_port = output.split("Web UI: http://127.0.0.1:")[1].split("/")[0]
    assert not any(f"--ui-port {ui_port} " in command for _, command in dev_servers())


@on_session_loop
async def test_a_lost_server_ends_the_wait_for_an_order_in_seconds() -> None:
    server = await start_dev_server()  # this test's own, to lose
    address = dev_address(server)
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    process = await spawn("order", "--order-id", order_id, "--drink", "latte", "--size", "M", address=address)
    assert process.stderr is not None
    try:
        # No worker runs, so the order waits, and the CLI with it, until the server goes.
        async with asyncio.timeout(10):
            no_worker = (await process.stderr.readline()).decode()
    finally:
        await server.shutdown()
    async with asyncio.timeout(20):
        out, err = await process.communicate()
    assert (process.returncode, out) == (1, b"")
    hint = "No worker polls task queue 'coffee-orders' yet; the order waits until `python coffee.py worker` runs."
    assert no_worker == hint + "\n"
    lost, once_back = err.decode().splitlines()
    assert lost.startswith(f"coffee.py: lost the Temporal server at {address} (")
    show = f"`{coffee.temporal_cli()} workflow show -w order-{order_id}`"
    assert once_back == f"Once it is back, {show} tells what became of order {order_id}."


@on_session_loop
@pytest.mark.parametrize(
    "stop_signal, brew_seconds, brew_attempts",
    [
        (signal.SIGKILL, "30", 2),  # a crash: the brew's heartbeats stop, and after 2 s it runs again elsewhere
        (signal.SIGTERM, "30", 2),  # a brew too long to wait 5 s for is handed back, to run again elsewhere
        (signal.SIGTERM, "1", 1),  # a gentle stop: the worker finishes the brew it holds, then exits
    ],
    ids=["sigkill", "sigterm-long-brew", "sigterm"],
)
async def test_an_order_outlives_the_worker_that_began_it(
    dev_server: WorkflowEnvironment, stop_signal: signal.Signals, brew_seconds: str, brew_attempts: int
) -> None:
    flags = ["--brew-seconds", brew_seconds, "--brew-failure-rate", "0"]
    first = await spawn("worker", *flags, address=dev_address(dev_server))
    assert first.stderr is not None
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    async with asyncio.timeout(20):
        await first.stderr.readline()  # the worker says it is polling
        # The customer follows the order with --query throughout, across the change of worker.
        placing = asyncio.create_task(
            run_cli(
                "order", "--order-id", order_id, "--drink", "latte", "--size", "M", "--query",
                address=dev_address(dev_server),
            )
        )  # fmt: skip
        handle = dev_server.client.get_workflow_handle_for(OrderCoffeeWorkflow.run, f"order-{order_id}")
        first_log = ""
        while f"Brewing latte (M) for order {order_id}" not in first_log:  # the worker's own word, not a query's
            line = await first.stderr.readline()
            assert line, first_log  # the worker ended before it brewed
            first_log += line.decode()
        first.send_signal(stop_signal)
        first_log += (await first.stderr.read()).decode()
        assert await first.wait() == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL)
    assert first_log.count(f"Charging order {order_id} for 525 cents") == 1
    assert (f"Brew complete for order {order_id}" in first_log) == (brew_attempts == 1)

    second = ServiceFactory(settings())
    async with worker(dev_server.client, second, task_queue=coffee.TASK_QUEUE):
        async with asyncio.timeout(30):
            code, out, err = await placing
        state = await handle.query(OrderCoffeeWorkflow.get_status)
    history = await handle.fetch_history()
    assert code == 0, err
    *states, result = out.split("\n{")
    assert OrderResult.model_validate_json("{" + result) == completed_latte(order_id)
    assert '"status":"COMPLETED"' in states[-1]  # the last state the query showed
    assert state.brew_attempts == brew_attempts
    assert ledger(second) == []  # the second worker never charged: the charge's result was already in the history
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
    assert [name for name in scheduled if name] == ["charge_customer", "brew_coffee", "send_receipt"]


# --- Models and pricing ---


def test_medium_latte_costs_450_plus_75() -> None:
    pricing = StandardPricingStrategy()
    assert pricing.price_cents(Drink.LATTE, Size.M) == 525
    assert pricing.price_cents(Drink.ESPRESSO, Size.M) == 450
    assert pricing.price_cents(Drink.LATTE, Size.L) - pricing.price_cents(Drink.LATTE, Size.M) == 100


def test_every_drink_and_size_has_a_price() -> None:
    pricing = StandardPricingStrategy()
    prices = {(d, s): pricing.price_cents(d, s) for d in Drink for s in Size}
    assert all(p > 0 for p in prices.values())
    # Bigger costs more, whatever the drink.
    assert all(prices[d, Size.S] < prices[d, Size.M] < prices[d, Size.L] for d in Drink)


@pytest.mark.parametrize(
    "fields, bad_field",
    [
        ({"order_id": "", **LATTE_M}, "order_id"),
        ({"order_id": "x" * 65, **LATTE_M}, "order_id"),
        ({"order_id": "12 3", **LATTE_M}, "order_id"),
        ({"order_id": "123", "drink": "tea", "size": "M"}, "drink"),
        ({"order_id": "123", "drink": "latte", "size": "XL"}, "size"),
    ],
)
def test_bad_orders_are_rejected_naming_the_field(fields: dict[str, str], bad_field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        OrderRequest.model_validate(fields)
    assert [e["loc"] for e in caught.value.errors()] == [(bad_field,)]


def test_order_ids_may_use_letters_digits_dash_and_underscore() -> None:
    assert OrderRequest(order_id="A-z_09" + "x" * 58, **LATTE_M).order_id.startswith("A-z_09")


# --- Activities, through ActivityEnvironment ---


# The order the activity tests pass, as order 123's workflow run "run-1" would.
LATTE_123 = OrderRequest(order_id="123", **LATTE_M)


def activity_env(run_id: str = "run-1", attempt: int = 1) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id="order-123", workflow_run_id=run_id, attempt=attempt)
    return env


@on_session_loop
async def test_charge_is_priced_and_a_retry_never_charges_twice() -> None:
    services = ServiceFactory(settings())
    activities = CoffeeActivities(services)
    order = LATTE_123
    assert await activity_env().run(activities.charge_customer, order) == 525
    assert await activity_env(attempt=2).run(activities.charge_customer, order) == 525
    assert ledger(services, order) == [("charge", 525)]


@on_session_loop
async def test_a_new_run_that_reuses_the_order_id_is_charged_again() -> None:
    services = ServiceFactory(settings())
    activities = CoffeeActivities(services)
    order = LATTE_123
    await activity_env(run_id="run-1").run(activities.charge_customer, order)
    await activity_env(run_id="run-2").run(activities.charge_customer, order)
    assert ledger(services, order) == [("charge", 525), ("charge", 525)]


@on_session_loop
async def test_refund_returns_the_charge_once() -> None:
    services = ServiceFactory(settings())
    activities = CoffeeActivities(services)
    order = LATTE_123
    env = activity_env()
    await env.run(activities.charge_customer, order)
    assert await env.run(activities.refund_customer, order) == 525
    assert await env.run(activities.refund_customer, order) == 525  # a retry reports the same refund
    assert ledger(services, order) == [("charge", 525), ("refund", 525)]


@on_session_loop
async def test_refund_without_a_charge_moves_no_money() -> None:
    services = ServiceFactory(settings())
    order = LATTE_123
    assert await activity_env().run(CoffeeActivities(services).refund_customer, order) == 0
    assert services.payment.ledger == []


@on_session_loop
async def test_brew_heartbeats_and_returns_its_attempt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    activities = CoffeeActivities(ServiceFactory(settings(brew_seconds=0.3)))
    env = activity_env(attempt=3)
    beats: list[object] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    assert await env.run(activities.brew_coffee, LATTE_123) == 3
    assert beats
    assert "Brewing latte (M) for order 123" in caplog.messages
    assert "Brew complete for order 123" in caplog.messages


@on_session_loop
async def test_brew_jams_at_the_configured_rate(caplog: pytest.LogCaptureFixture) -> None:
    activities = CoffeeActivities(ServiceFactory(settings(brew_failure_rate=1.0)))
    with pytest.raises(BrewMachineJammed, match="Brew machine jammed for order 123!"):
        await activity_env().run(activities.brew_coffee, LATTE_123)
    assert "Brew machine jammed for order 123!" in caplog.messages


@on_session_loop
async def test_a_forced_jam_hits_only_the_first_attempt() -> None:
    activities = CoffeeActivities(ServiceFactory(settings(jam_first_attempt_of=frozenset({"123"}))))
    order = LATTE_123
    with pytest.raises(BrewMachineJammed):
        await activity_env().run(activities.brew_coffee, order)
    assert await activity_env(attempt=2).run(activities.brew_coffee, order) == 2


@on_session_loop
async def test_a_cancelled_brew_stops_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    activities = CoffeeActivities(ServiceFactory(settings(brew_seconds=30)))
    env = activity_env()
    brewing = asyncio.create_task(env.run(activities.brew_coffee, LATTE_123))
    await asyncio.sleep(0.2)
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2):
            await brewing
    assert "Brew stopped for order 123" in caplog.messages


@on_session_loop
async def test_receipt_names_the_order_and_amount(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    activities = CoffeeActivities(ServiceFactory(settings()))
    receipt = Receipt(order=LATTE_123, amount_cents=525)
    await activity_env().run(activities.send_receipt, receipt)
    assert "Receipt sent for order 123: latte (M), 525 cents" in caplog.messages


def test_the_factory_builds_each_service_once() -> None:
    services = ServiceFactory(settings())
    assert services.payment is services.payment
    assert services.brewing is services.brewing
    assert services.notification is services.notification
    assert services.pricing is services.pricing


# --- The workflow, on the time-skipping server ---


@on_session_loop
async def test_happy_path_charges_525_brews_and_sends_the_receipt(time_skipping: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings())
    order = new_order()
    async with worker(time_skipping.client, services) as queue:
        handle = await start(time_skipping.client, order, queue)
        result = await handle.result()
    assert result == completed_latte(order.order_id)
    assert ledger(services, order) == [("charge", 525)]


@on_session_loop
async def test_the_recorded_history_holds_the_seed_retry_policy_and_timeouts(
    time_skipping: WorkflowEnvironment,
) -> None:
    order = new_order()
    async with worker(time_skipping.client, ServiceFactory(settings())) as queue:
        handle = await start(time_skipping.client, order, queue)
        await handle.result()
        history = await handle.fetch_history()
    scheduled = {
        e.activity_task_scheduled_event_attributes.activity_type.name: e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    assert list(scheduled) == ["charge_customer", "brew_coffee", "send_receipt"]
    for attributes in scheduled.values():
        policy = attributes.retry_policy
        assert (policy.maximum_attempts, policy.initial_interval.seconds, policy.backoff_coefficient) == (5, 1, 2.0)
        assert attributes.start_to_close_timeout.seconds > 0
    assert scheduled["brew_coffee"].heartbeat_timeout.seconds == 2


@on_session_loop
async def test_a_jam_is_retried_and_the_order_completes(time_skipping: WorkflowEnvironment) -> None:
    order = new_order()
    services = ServiceFactory(settings(jam_first_attempt_of=frozenset({order.order_id})))
    async with worker(time_skipping.client, services) as queue:
        handle = await start(time_skipping.client, order, queue)
        result = await handle.result()
        state = await handle.query(OrderCoffeeWorkflow.get_status)
    assert (result.status, result.brewed, result.amount_cents) == (OrderStatus.COMPLETED, True, 525)
    assert state.brew_attempts == 2
    assert ledger(services, order) == [("charge", 525)]


@on_session_loop
async def test_five_jams_fail_the_order_and_refund_the_charge(time_skipping: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings(brew_failure_rate=1.0))
    order = new_order()
    started = time.monotonic()
    async with worker(time_skipping.client, services) as queue:
        handle = await start(time_skipping.client, order, queue)
        result = await handle.result()
        state = await handle.query(OrderCoffeeWorkflow.get_status)
        history = await handle.fetch_history()
    # 1 + 2 + 4 + 8 s of back-off between the five attempts, skipped rather than slept.
    assert time.monotonic() - started < 10
    # The server records each activity's last attempt: the charge's first, the brew's fifth, the refund's first.
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    assert attempts == [1, 5, 1]
    assert (result.status, result.brewed, result.refunded) == (OrderStatus.FAILED, False, True)
    assert state.last_error == f"BrewMachineJammed: Brew machine jammed for order {order.order_id}!"
    assert ledger(services, order) == [("charge", 525), ("refund", 525)]


@on_session_loop
async def test_the_workflow_replays_deterministically(time_skipping: WorkflowEnvironment) -> None:
    order = new_order()
    services = ServiceFactory(settings(jam_first_attempt_of=frozenset({order.order_id})))
    async with worker(time_skipping.client, services) as queue:
        handle = await start(time_skipping.client, order, queue)
        await handle.result()
        history = await handle.fetch_history()
    await assert_replays(history)
    # The check can fail: a workflow that brews before it charges does not fit this history.
    reordered = Replayer(
        workflows=[BrewFirstWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    replay = await reordered.replay_workflow(history, raise_on_replay_failure=False)
    assert isinstance(replay.replay_failure, NondeterminismError)


async def assert_replays(history: WorkflowHistory) -> None:
    replayer = Replayer(workflows=[OrderCoffeeWorkflow], data_converter=pydantic_data_converter)
    replay = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert replay.replay_failure is None


@workflow.defn(name="OrderCoffeeWorkflow")
class BrewFirstWorkflow:
    @workflow.run
    async def run(self, order: OrderRequest) -> None:
        for step in ("brew_coffee", "charge_customer"):
            await workflow.execute_activity(step, order, start_to_close_timeout=timedelta(seconds=10))


@on_session_loop
async def test_bad_input_from_another_client_fails_the_workflow_at_once(dev_server: WorkflowEnvironment) -> None:
    # A client with the default JSON converter and no coffee.py types, as another SDK or `temporal workflow start` is.
    raw = await Client.connect(dev_address(dev_server))
    async with worker(dev_server.client, ServiceFactory(settings())) as queue:
        handle = await raw.start_workflow(
            "OrderCoffeeWorkflow",
            {"order_id": "1", "drink": "tea", "size": "M"},
            id=f"order-{uuid.uuid4()}",
            task_queue=queue,
        )
        with pytest.raises(WorkflowFailureError) as caught:
            async with asyncio.timeout(5):  # a failed workflow task would be retried forever instead
                await handle.result()
    assert isinstance(caught.value.cause, ApplicationError)
    assert caught.value.cause.type == "ValidationError"
    assert "drink" in caught.value.cause.message and "'espresso', 'latte' or 'mocha'" in caught.value.cause.message


BAD_WORKFLOW_INPUT = [
    (["--input", '{"order_id":"1","drink":"tea","size":"M"}'], "ValidationError", "drink\n  Input should be 'espr"),
    ([], "MissingOrder", "OrderCoffeeWorkflow needs an order as its input"),
    (["--input", "null"], "MissingOrder", "OrderCoffeeWorkflow needs an order as its input"),
]


@on_session_loop
async def test_bad_or_missing_input_from_the_temporal_cli_fails_the_workflow_at_once(
    dev_server: WorkflowEnvironment,
) -> None:
    temporal = coffee.find_binary("temporal")
    assert temporal

    async def start_with(queue: str, input_args: list[str]) -> BaseException | None:
        workflow_id = f"order-{uuid.uuid4()}"
        process = await asyncio.create_subprocess_exec(
            temporal, "workflow", "start", "--address", dev_address(dev_server), "--task-queue", queue,
            "--type", "OrderCoffeeWorkflow", "--workflow-id", workflow_id, *input_args,
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await process.wait() == 0
        with pytest.raises(WorkflowFailureError) as caught:
            async with asyncio.timeout(5):  # a failed workflow task would be retried forever instead
                await dev_server.client.get_workflow_handle(workflow_id).result()
        return caught.value.cause

    async with worker(dev_server.client, ServiceFactory(settings())) as queue:
        causes = await asyncio.gather(*(start_with(queue, args) for args, _, _ in BAD_WORKFLOW_INPUT))
    for (args, error_type, message), cause in zip(BAD_WORKFLOW_INPUT, causes, strict=True):
        assert isinstance(cause, ApplicationError), args
        assert cause.type == error_type, args
        assert message in cause.message, args


# --- The workflow, on the dev server: a live query and a cancel that reaches a running brew ---


@on_session_loop
async def test_get_status_reports_the_order_while_it_brews(dev_server: WorkflowEnvironment) -> None:
    async with held_step(dev_server, ServiceFactory(settings()), "brew_coffee") as (handle, release):
        state = await handle.query("get_status")  # by name, as any other client would
        assert state["status"] == "BREWING"
        assert state["amount_cents"] == 525
        assert state["charged"] is True
        assert state["brewed"] is False
        assert state["history"] == ["RECEIVED", "CHARGING", "Charged 525 cents", "BREWING"]
        release.set()
        result = await handle.result()
        final = await handle.query(OrderCoffeeWorkflow.get_status)
        described = await handle.describe()
    assert result.status == OrderStatus.COMPLETED
    # updated_at comes from workflow.now(): the time of the workflow task that made the last change.
    assert described.close_time is not None
    assert described.start_time <= final.updated_at <= described.close_time
    assert final.history[-3:] == ["SENDING_RECEIPT", "Receipt sent", "COMPLETED"]
    assert final.brew_attempts == 1


@on_session_loop
async def test_following_an_order_rides_out_a_query_that_no_worker_answers(
    dev_server: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with worker(dev_server.client, ServiceFactory(settings())) as queue:
        handle = await start(dev_server.client, new_order(), queue)
        await handle.result()
        answer = handle.query
        asked = 0

        async def unanswered_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal asked
            asked += 1
            if asked == 1:  # what the server says while no worker runs: at once, or after 30 s of waiting
                raise RPCError("no poller seen for task queue recently", RPCStatusCode.FAILED_PRECONDITION, b"")
            return await answer(*args, **kwargs)

        monkeypatch.setattr(handle, "query", unanswered_once)
        seen: list[str] = []
        async with asyncio.timeout(5):
            await coffee.follow_state(handle, lambda state, new_events: seen.extend(new_events))
    assert asked == 2
    assert seen[-1] == "COMPLETED"


@asynccontextmanager
async def espresso_brewing(
    env: WorkflowEnvironment, services: ServiceFactory
) -> AsyncIterator[WorkflowHandle[OrderCoffeeWorkflow, OrderResult]]:
    """A small espresso that has been charged and has begun a 20 s brew, its worker running."""
    async with worker(env.client, services) as queue:
        handle = await start(env.client, new_order(Drink.ESPRESSO, Size.S), queue)
        await wait_for_status(handle, OrderStatus.BREWING)
        yield handle


@on_session_loop
async def test_cancel_mid_brew_stops_the_brew_and_refunds(dev_server: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings(brew_seconds=20.0))
    async with espresso_brewing(dev_server, services) as handle:
        await handle.signal("cancel_order")
        async with asyncio.timeout(5):  # far less than the 20 s brew: it was stopped, not finished
            result = await handle.result()
        history = await handle.fetch_history()
    assert (result.status, result.charged, result.brewed, result.refunded) == (OrderStatus.CANCELLED, True, False, True)
    assert ledger(services) == [("charge", 350), ("refund", 350)]
    events = [e.event_type for e in history.events]
    # The refund was scheduled only after the brew had reported itself cancelled.
    cancelled = events.index(EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED)
    refund = [
        i
        for i, e in enumerate(history.events)
        if e.activity_task_scheduled_event_attributes.activity_type.name == "refund_customer"
    ]
    assert refund and refund[0] > cancelled
    await assert_replays(history)


@on_session_loop
async def test_a_cancel_from_outside_refunds_then_ends_the_workflow_cancelled(dev_server: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings(brew_seconds=20.0))
    async with espresso_brewing(dev_server, services) as handle:
        await handle.cancel()  # what `temporal workflow cancel` and the web UI's Cancel button do
        with pytest.raises(WorkflowFailureError) as caught:
            async with asyncio.timeout(5):
                await handle.result()
        state = await handle.query(OrderCoffeeWorkflow.get_status)
    assert isinstance(caught.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    await assert_replays(await handle.fetch_history())
    assert (state.status, state.brewed, state.refunded) == (OrderStatus.CANCELLED, False, True)
    assert ledger(services) == [("charge", 350), ("refund", 350)]


@on_session_loop
async def test_a_cancel_from_outside_does_not_stop_a_refund_that_is_retrying(dev_server: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings(brew_seconds=20.0))
    activities = CoffeeActivities(services)
    refund_attempts = 0

    @activity.defn(name="refund_customer")
    async def refund_that_fails_once(order: OrderRequest) -> int:
        nonlocal refund_attempts
        refund_attempts += 1
        if refund_attempts == 1:
            raise RuntimeError("payment provider briefly unavailable")
        return await activities.refund_customer(order)

    order = new_order(Drink.ESPRESSO, Size.S)
    queue = f"test-{uuid.uuid4()}"
    mocked = [activities.charge_customer, activities.brew_coffee, activities.send_receipt, refund_that_fails_once]
    async with Worker(dev_server.client, task_queue=queue, workflows=[OrderCoffeeWorkflow], activities=mocked):
        handle = await start(dev_server.client, order, queue)
        await wait_for_status(handle, OrderStatus.BREWING)
        await handle.signal(OrderCoffeeWorkflow.cancel_order)
        await wait_for_status(handle, OrderStatus.REFUNDING)
        await handle.cancel()  # lands while the refund waits 1 s for its second attempt
        with pytest.raises(WorkflowFailureError):
            async with asyncio.timeout(10):
                await handle.result()
    assert refund_attempts == 2
    assert ledger(services, order) == [("charge", 350), ("refund", 350)]


@on_session_loop
async def test_a_cancel_before_the_charge_moves_no_money(time_skipping: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings())
    order = new_order()
    queue = f"test-{uuid.uuid4()}"
    handle = await start(time_skipping.client, order, queue)
    await handle.signal(OrderCoffeeWorkflow.cancel_order)  # no worker yet, so the order has not begun
    async with worker(time_skipping.client, services, task_queue=queue):
        result = await handle.result()
    assert (result.status, result.charged, result.refunded) == (OrderStatus.CANCELLED, False, False)
    assert services.payment.ledger == []


async def cancel(handle: WorkflowHandle[OrderCoffeeWorkflow, OrderResult], way: str) -> None:
    """Cancel as a customer does (the cancel_order signal) or as an operator does (Temporal's own cancel),
    then wait until the workflow has taken the request in."""
    if way == "signal":
        await handle.signal(OrderCoffeeWorkflow.cancel_order)
        request = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    else:
        await handle.cancel()
        request = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED
    async with asyncio.timeout(10):
        while True:
            events = [e.event_type for e in (await handle.fetch_history()).events]
            if request in events and EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in events[events.index(request) :]:
                return
            await asyncio.sleep(0.05)


@asynccontextmanager
async def held_step(
    env: WorkflowEnvironment, services: ServiceFactory, step: str
) -> AsyncIterator[tuple[WorkflowHandle[OrderCoffeeWorkflow, OrderResult], asyncio.Event]]:
    """A latte whose charge, brew or receipt activity has begun and holds until the test sets the event it yields."""
    activities = CoffeeActivities(services)
    started, release = asyncio.Event(), asyncio.Event()
    real_ones = {a.__name__: a for a in activities.all()}
    real = real_ones[step]

    @activity.defn(name=step)
    async def held(order_or_receipt: OrderRequest | Receipt) -> Any:
        started.set()
        await release.wait()  # no heartbeats, so a cancel cannot reach it: like a payment call already on the wire
        return await real(order_or_receipt)

    mocked = real_ones | {step: held}
    queue = f"test-{uuid.uuid4()}"
    async with Worker(env.client, task_queue=queue, workflows=[OrderCoffeeWorkflow], activities=mocked.values()):
        handle = await start(env.client, new_order(), queue)
        async with asyncio.timeout(10):
            await started.wait()
        yield handle, release


@on_session_loop
@pytest.mark.parametrize("way", ["signal", "cancel"])
async def test_a_charge_that_lands_after_a_cancel_is_refunded(dev_server: WorkflowEnvironment, way: str) -> None:
    services = ServiceFactory(settings())
    async with held_step(dev_server, services, "charge_customer") as (handle, release):
        await cancel(handle, way)
        release.set()  # the charge goes through after all
        result = await coffee.wait_for_order(handle)
        history = await handle.fetch_history()
    assert (result.status, result.charged, result.brewed, result.refunded) == (OrderStatus.CANCELLED, True, False, True)
    assert ledger(services) == [("charge", 525), ("refund", 525)]
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
    assert "brew_coffee" not in scheduled


@on_session_loop
@pytest.mark.parametrize(
    "way, note",
    [
        ("signal", "Cancel request declined: the order is already SENDING_RECEIPT"),
        ("cancel", "Cancel request declined: the coffee was already brewed"),
    ],
    ids=["signal", "cancel"],
)
async def test_a_cancel_after_brewing_is_declined_and_the_order_completes(
    dev_server: WorkflowEnvironment, way: str, note: str
) -> None:
    services = ServiceFactory(settings())
    async with held_step(dev_server, services, "send_receipt") as (handle, release):
        await cancel(handle, way)
        release.set()
        result = await handle.result()  # completed, not cancelled, whichever way the cancel came
        state = await handle.query(OrderCoffeeWorkflow.get_status)
        history = await handle.fetch_history()
    assert (result.status, result.receipt_sent, result.refunded) == (OrderStatus.COMPLETED, True, False)
    assert note in state.history
    assert ledger(services) == [("charge", 525)]
    # The receipt was never asked to stop.
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED not in [e.event_type for e in history.events]


# --- The command line, as a user runs it ---


@on_session_loop
async def test_order_prints_the_seed_result_as_json(dev_server: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings())
    async with worker(dev_server.client, services, task_queue=coffee.TASK_QUEUE):
        order_id = f"cli-{uuid.uuid4().hex[:8]}"
        code, out, err = await run_cli(
            "order", "--order-id", order_id, "--drink", "latte", "--size", "M", address=dev_address(dev_server)
        )
    assert code == 0, err
    assert OrderResult.model_validate_json(out) == completed_latte(order_id)
    assert list(OrderResult.model_validate_json(out).model_dump()) == [
        "order_id", "status", "charged", "brewed", "receipt_sent", "amount_cents", "refunded"
    ]  # fmt: skip


@on_session_loop
async def test_order_query_prints_each_state_then_the_result(dev_server: WorkflowEnvironment) -> None:
    async with worker(dev_server.client, ServiceFactory(settings(brew_seconds=0.5)), task_queue=coffee.TASK_QUEUE):
        code, out, err = await run_cli(
            "order", "--order-id", f"cli-{uuid.uuid4().hex[:8]}", "--drink", "mocha", "--size", "L", "--query",
            address=dev_address(dev_server),
        )  # fmt: skip
    assert code == 0, err
    print(out)
    *states, result = out.split("\n{")
    assert '"status":"BREWING"' in "".join(states)
    assert '"status": "COMPLETED"' in result
    assert '"amount_cents": 650' in result


@on_session_loop
async def test_order_cancel_after_refunds_a_brewing_espresso(dev_server: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings(brew_seconds=20))
    async with worker(dev_server.client, services, task_queue=coffee.TASK_QUEUE):
        code, out, err = await run_cli(
            "order", "--order-id", f"cli-{uuid.uuid4().hex[:8]}", "--drink", "espresso", "--size", "S",
            "--cancel-after", "0.5", address=dev_address(dev_server),
        )  # fmt: skip
    assert code == 0, err
    result = OrderResult.model_validate_json(out)
    assert (result.status, result.brewed, result.refunded, result.amount_cents) == ("CANCELLED", False, True, 350)


@on_session_loop
async def test_order_notes_a_cancel_that_came_too_late(dev_server: WorkflowEnvironment) -> None:
    async with worker(dev_server.client, ServiceFactory(settings()), task_queue=coffee.TASK_QUEUE):
        code, out, err = await run_cli(
            "order", "--order-id", f"cli-{uuid.uuid4().hex[:8]}", "--drink", "latte", "--size", "M",
            "--cancel-after", "30", address=dev_address(dev_server),
        )  # fmt: skip
    assert code == 0
    assert OrderResult.model_validate_json(out).status == "COMPLETED"
    assert err.splitlines() == ["Note: the cancel came after the coffee was brewed, so the order went ahead."]


@on_session_loop
async def test_order_reports_a_cancel_from_outside_as_cancelled(dev_server: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings(brew_seconds=20))
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    async with worker(dev_server.client, services, task_queue=coffee.TASK_QUEUE):
        cli = asyncio.create_task(
            run_cli("order", "--order-id", order_id, "--drink", "latte", "--size", "M", address=dev_address(dev_server))
        )
        handle = dev_server.client.get_workflow_handle_for(OrderCoffeeWorkflow.run, f"order-{order_id}")
        await wait_until_started(handle)
        await wait_for_status(handle, OrderStatus.BREWING)
        await handle.cancel()
        code, out, err = await cli
    assert code == 0, err
    assert "Traceback" not in err
    result = OrderResult.model_validate_json(out)
    assert (result.status, result.brewed, result.refunded) == ("CANCELLED", False, True)
    assert ledger(services) == [("charge", 525), ("refund", 525)]


async def wait_until_started(handle: WorkflowHandle[Any, Any]) -> None:
    """Wait until the workflow that another process is starting exists."""
    async with asyncio.timeout(10):
        while True:
            try:
                await handle.describe()
                return
            except RPCError:
                await asyncio.sleep(0.05)


@on_session_loop
async def test_a_stopped_order_command_leaves_the_order_running(dev_server: WorkflowEnvironment) -> None:
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    latte = ["order", "--order-id", order_id, "--drink", "latte", "--size", "M"]
    process = await spawn(*latte, address=dev_address(dev_server))
    handle = dev_server.client.get_workflow_handle(f"order-{order_id}")
    try:
        await wait_until_started(handle)  # no worker runs, so the order waits, and the command with it
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            out, err = await process.communicate()
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    finally:
        await handle.terminate()
    assert (process.returncode, out) == (130, b"")
    show = f"`{coffee.temporal_cli()} workflow show -w order-{order_id}`"
    assert err.decode().splitlines()[-1] == f"Stopped waiting. The order goes on; see it with {show}."


@on_session_loop
async def test_order_exits_1_when_five_jams_fail_the_order(time_skipping: WorkflowEnvironment) -> None:
    services = ServiceFactory(settings(brew_failure_rate=1.0))
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    async with worker(time_skipping.client, services, task_queue=coffee.TASK_QUEUE):
        placing = asyncio.create_task(
            run_cli(
                "order", "--order-id", order_id, "--drink", "latte", "--size", "M", address=dev_address(time_skipping)
            )
        )
        await wait_until_started(time_skipping.client.get_workflow_handle(f"order-{order_id}"))
        async with asyncio.timeout(10):
            await time_skipping.sleep(timedelta(seconds=30))  # skips the 15 s of back-off between the five brews
            code, out, err = await placing
    assert code == 1, err
    result = OrderResult.model_validate_json(out)
    assert (result.status, result.charged, result.brewed, result.refunded) == ("FAILED", True, False, True)
    assert ledger(services) == [("charge", 525), ("refund", 525)]


@on_session_loop
async def test_connect_follows_temporal_environment_configuration(
    dev_server: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", dev_address(dev_server))
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "coffee-shop")
    client = await coffee.connect()
    assert (client.service_client.config.target_host, client.namespace) == (dev_address(dev_server), "coffee-shop")
    assert client.data_converter is pydantic_data_converter


def test_a_worker_without_flags_brews_as_the_seed_does(capsys: pytest.CaptureFixture[str]) -> None:
    args = coffee.parse_args(["worker"])
    assert (args.brew_failure_rate, args.brew_seconds) == (0.3, 2.5)
    with pytest.raises(SystemExit):
        coffee.parse_args(["worker", "--help"])
    assert "(default 0.3)" in capsys.readouterr().out


@on_session_loop
async def test_the_worker_process_serves_orders_with_its_flags(dev_server: WorkflowEnvironment) -> None:
    process = await spawn("worker", "--brew-seconds", "0", "--brew-failure-rate", "0", address=dev_address(dev_server))
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            await process.stderr.readline()  # the worker says it is polling
            order = new_order()
            handle = await start(dev_server.client, order, coffee.TASK_QUEUE)
            started = time.monotonic()
            result = await handle.result()
            state = await handle.query(OrderCoffeeWorkflow.get_status)
        assert time.monotonic() - started < 2  # far less than the 2.5 s a default brew takes
        assert (result.status, result.amount_cents, state.brew_attempts) == (OrderStatus.COMPLETED, 525, 1)
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()


@on_session_loop
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
async def test_the_worker_stops_cleanly_on_ctrl_c_and_sigterm(
    dev_server: WorkflowEnvironment, stop_signal: signal.Signals
) -> None:
    process = await spawn("worker", address=dev_address(dev_server))
    assert process.stderr is not None
    async with asyncio.timeout(20):
        assert b"Worker polling task queue 'coffee-orders'" in await process.stderr.readline()
        process.send_signal(stop_signal)
        log = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    assert log.splitlines()[-1].endswith("coffee.worker: Worker stopped")
    assert "Traceback" not in log


@on_session_loop
async def test_another_client_drives_an_order_by_its_names_alone(dev_server: WorkflowEnvironment) -> None:
    # A client without coffee.py's types or converter, as another SDK or the `temporal` CLI is: it knows only names.
    raw = await Client.connect(dev_address(dev_server))
    services = ServiceFactory(settings(brew_seconds=20))
    order_id = f"cli-{uuid.uuid4().hex[:8]}"
    async with coffee.new_worker(dev_server.client, services):  # on the default task queue
        placing = asyncio.create_task(
            run_cli(
                "order", "--order-id", order_id, "--drink", "espresso", "--size", "S", address=dev_address(dev_server)
            )
        )
        handle = raw.get_workflow_handle(f"order-{order_id}")
        await wait_until_started(handle)
        async with asyncio.timeout(10):
            while (await handle.query("get_status"))["status"] != "BREWING":
                await asyncio.sleep(0.05)
        await handle.signal("cancel_order")
        result = await handle.result()
        described = await handle.describe()
        code, out, err = await placing
    assert (described.workflow_type, described.task_queue) == ("OrderCoffeeWorkflow", "coffee-orders")
    assert result == {
        "order_id": order_id,
        "status": "CANCELLED",
        "charged": True,
        "brewed": False,
        "receipt_sent": False,
        "amount_cents": 350,
        "refunded": True,
    }
    assert code == 0, err
    assert OrderResult.model_validate_json(out).model_dump(mode="json") == result
    assert ledger(services) == [("charge", 350), ("refund", 350)]


BAD_INPUT = [
    (["order", "--order-id", "1", "--drink", "tea", "--size", "M"], "invalid choice: 'tea' (choose from"),
    (["order", "--order-id", "1", "--drink", "latte", "--size", "XL"], "invalid choice: 'XL' (choose from"),
    (["order", "--order-id", "", "--drink", "latte", "--size", "M"], "'': use 1 to 64 letters"),
    (["order", "--order-id", "no spaces", "--drink", "latte", "--size", "M"], "1 to 64 letters"),
    (["order", "--order-id", "x" * 65, "--drink", "latte", "--size", "M"], "1 to 64 letters"),
    (["order", "--order-id", "1", "--drink", "latte", "--size", "M", "--cancel-after", "-1"], "0 or more"),
    (["worker", "--brew-failure-rate", "1.5"], "1.5 is not between 0 and 1"),
    (["worker", "--brew-seconds", "-2"], "-2 is not a number of seconds"),
    (["brew"], "invalid choice: 'brew'"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_exits_2_with_a_message(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        coffee.main(args)
    out, err = capsys.readouterr()
    assert (exit.value.code, out) == (2, "")
    assert message in err.splitlines()[-1]


@pytest.mark.parametrize("flag, choices", [("--drink", Drink), ("--size", Size)])
def test_an_unknown_drink_or_size_is_answered_with_the_valid_ones(
    flag: str, choices: type[StrEnum], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        coffee.main(["order", "--order-id", "1", "--drink", "latte", "--size", "M", flag, "?"])  # the last one counts
    offered = capsys.readouterr().err.split("(choose from")[1]
    assert all(choice.value in offered for choice in choices)


@on_session_loop
async def test_bad_input_to_the_process_exits_2_without_a_traceback() -> None:
    code, out, err = await run_cli("order", "--order-id", "no spaces", "--drink", "latte", "--size", "M", address="")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1].startswith("coffee.py order: error: argument --order-id: 'no spaces': use 1 to 64")


@on_session_loop
async def test_order_refuses_an_id_that_is_still_running(dev_server: WorkflowEnvironment) -> None:
    order = new_order()
    # No worker polls this queue, so the first order waits, running, until the test ends it.
    running = await start(dev_server.client, order, f"test-{uuid.uuid4()}")
    try:
        code, out, err = await run_cli(
            "order", "--order-id", order.order_id, "--drink", "latte", "--size", "M", address=dev_address(dev_server)
        )
    finally:
        await running.terminate()
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"coffee.py: order {order.order_id} is still running; choose another --order-id."]
    history = await running.fetch_history()
    # The refused second order neither signalled, cancelled nor restarted the first: only the test's terminate shows.
    assert [e.event_type for e in history.events] == [
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    ]


@on_session_loop
async def test_order_and_worker_without_a_server_say_how_to_get_one() -> None:
    runs = await asyncio.gather(
        run_cli("order", "--order-id", "1", "--drink", "latte", "--size", "M", address="127.0.0.1:1"),
        run_cli("worker", address="127.0.0.1:1"),
    )
    start_one = (
        f"Start one with `{coffee.temporal_cli()} server start-dev`, or run `python coffee.py demo`, which needs none."
    )
    for code, out, err in runs:
        assert (code, out) == (1, "")
        assert err.splitlines() == ["coffee.py: no Temporal server answered at 127.0.0.1:1.", start_one]


@on_session_loop
async def test_configuration_mistakes_get_one_line(dev_server: WorkflowEnvironment) -> None:
    order = ["order", "--order-id", "1", "--drink", "latte", "--size", "M"]
    no_namespace = "coffee.py: the Temporal server refused the request: Namespace nowhere is not found."
    cases = [
        (order, {"TEMPORAL_PROFILE": "nowhere"}, "coffee.py: could not read Temporal's client configuration:"),
        (order, {"TEMPORAL_NAMESPACE": "nowhere"}, no_namespace),
        (["worker"], {"TEMPORAL_NAMESPACE": "nowhere"}, no_namespace),
    ]
    runs = await asyncio.gather(
        *(run_cli(*args, address=dev_address(dev_server), **environment) for args, environment, _ in cases)
    )
    for (args, environment, message), (code, _, err) in zip(cases, runs, strict=True):
        assert code == 1, (args, environment)
        assert len(err.splitlines()) == 1 and err.startswith(message), (args, environment, err)


@on_session_loop
async def test_a_worker_whose_server_is_lost_still_stops_on_sigterm() -> None:
    server = await start_dev_server()  # this test's own, to lose
    try:
        process = await spawn("worker", address=dev_address(server))
        async with asyncio.timeout(10):
            while not await coffee.worker_is_polling(server.client, coffee.TASK_QUEUE):
                await asyncio.sleep(0.05)
    finally:
        await server.shutdown()
    assert process.stderr is not None
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        log = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    assert "Traceback" not in log
    assert log.splitlines()[-1].endswith("coffee.worker: Worker stopped")


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


@on_session_loop
async def test_the_demo_uses_a_server_that_answers(
    dev_server: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", dev_address(dev_server))
    started_here_before = [command for parent, command in dev_servers() if parent == os.getpid()]
    async with coffee.demo_client() as client:
        assert client.service_client.config.target_host == dev_address(dev_server)
        assert [command for parent, command in dev_servers() if parent == os.getpid()] == started_here_before
    assert f"Using the Temporal server at {dev_address(dev_server)}." in capsys.readouterr().out


def test_web_ui_links() -> None:
    assert coffee.web_ui_url("localhost:7233", "default") == "http://localhost:8233/namespaces/default/workflows"
    assert coffee.web_ui_url("127.0.0.1:40001", "dev") == "http://127.0.0.1:41001/namespaces/dev/workflows"
    assert (
        coffee.web_ui_url("shop.a1b2c.tmprl.cloud:7233", "shop.a1b2c")
        == "https://cloud.temporal.io/namespaces/shop.a1b2c/workflows"
    )


@on_session_loop
async def test_the_demo_explains_a_dev_server_that_will_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(coffee, "find_binary", lambda name: "/nonexistent/temporal")
    with pytest.raises(coffee.CommandError, match="could not start a Temporal dev server") as caught:
        async with coffee.demo_client():
            pass
    assert "pip install -r requirements.txt" in str(caught.value)


@on_session_loop
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
async def test_a_stopped_demo_takes_its_server_with_it(dev_server: WorkflowEnvironment, stop_signal: int) -> None:
    process = await spawn("demo", address="127.0.0.1:1")
    assert process.stderr is not None
    async with asyncio.timeout(20):
        while b"Brewing latte" not in (line := await process.stderr.readline()):
            assert line, "the demo ended before it brewed"
        [demo_server] = [command for parent, command in dev_servers() if parent == process.pid]
        process.send_signal(stop_signal)
        out, log = await process.communicate()
    assert process.returncode == 130
    assert out.decode().splitlines()[-1] == "Demo stopped."
    assert b"Traceback" not in out + log
    # The brew stops at once: the demo does not wait for it, as a worker on SIGTERM would.
    assert b"Brew stopped for order latte-" in log and b"jammed" not in log
    assert demo_server not in [command for _, command in dev_servers()]
