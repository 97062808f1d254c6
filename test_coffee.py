"""The tests of coffee.py, by subject: the providers; an activity; the workflow on the time-skipping server, where
retries take no time; orders started by other clients; the recorded histories; the workflow on a dev server, in real
time (cancels, slow calls, a slow provider under load, a killed worker, a restarted server, bugs); the command line;
the demo. Money is read from the provider's records, coffees
and receipts from the services' log lines, Temporal's behaviour from the event history. Waits are on events, each
with a generous guard, so that a busy machine slows a test but never fails it. pytest-xdist runs five processes."""

import asyncio
import base64
import contextlib
import functools
import inspect
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.common import RawValue
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory, CancelledError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

import coffee
from coffee import BrewService, NotificationService, OrderCoffeeWorkflow, OrderRequest, OrderResult, Payment

HERE = Path(__file__).parent
HISTORIES = HERE / ".histories"  # event histories recorded by this edition's workflow, replayed by every change
slow_first = pytest.mark.order("first")  # the slowest tests start first, each on a process of its own
Handle = WorkflowHandle[OrderCoffeeWorkflow, OrderResult]


# --- Fixtures and helpers ---
def beside_python(name: str) -> str | None:
    """A binary that a pip package put beside this Python (the venv's bin/)."""
    return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)


@pytest.fixture(scope="session")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=beside_python("temporal"),
        dev_server_log_level="error",
        dev_server_extra_args=["--output", "none"],
    ) as env:
        yield env


@pytest.fixture(scope="session")
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=beside_python("temporal-test-server")
    ) as env:
        yield env


@pytest.fixture(autouse=True)
def own_task_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task queue of the test's own, so that no test's worker takes another's orders. The command line's tests
    use coffee-orders itself (the cli fixture): coffee.py, run as a process, knows no other."""
    monkeypatch.setattr(coffee, "TASK_QUEUE", f"test-{uuid.uuid4()}")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coffee, "TASK_QUEUE", "coffee-orders")


@pytest.fixture(autouse=True)
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def said(caplog: pytest.LogCaptureFixture, order: OrderRequest | str) -> list[str]:
    """What the services logged of this order, in order: the seed's log lines."""
    order_id = order if isinstance(order, str) else order.order_id
    return [r.getMessage() for r in caplog.records if r.name.startswith("coffee.") and order_id in r.getMessage()]


def count(lines: list[str], text: str) -> int:
    return sum(text in line for line in lines)


def tally(caplog: pytest.LogCaptureFixture, order: OrderRequest) -> dict[str, int]:
    """The order's charges, coffees, receipts and refunds, as the services logged them."""
    said_it = {
        "charges": "Charge successful",
        "coffees": "Brew complete",
        "receipts": "Receipt sent",
        "refunds": "Refunded",
    }
    return {what: count(said(caplog, order), text) for what, text in said_it.items()}


async def run_order(
    env: WorkflowEnvironment, factory: coffee.ServiceFactory, order: OrderRequest
) -> tuple[Handle, OrderResult]:
    async with coffee.new_worker(env.client, factory):
        handle = await coffee.start_order(env.client, order)
        return handle, await handle.result()


def services(**settings: Any) -> coffee.ServiceFactory:
    """Instant brews that never jam and a payment provider of the test's own, unless the test says otherwise."""
    return coffee.ServiceFactory(**{"brew_failure_rate": 0.0, "brew_seconds": 0.0, "records": ":memory:", **settings})


def new_order(drink: str = "latte", size: str = "M") -> OrderRequest:
    return OrderRequest(order_id=f"t-{uuid.uuid4().hex[:10]}", drink=drink, size=size)  # type: ignore[arg-type]


def paying(order_id: str, cents: int = 525) -> Payment:
    return Payment(order_id=order_id, cents=cents, first_run_id="the first start")


class FirstBrewJams(BrewService):
    def __init__(self) -> None:
        super().__init__(failure_rate=0, seconds=0)

    def jams(self, order: OrderRequest) -> bool:
        return activity.info().attempt == 1


def completed(order: OrderRequest, cents: int = 525) -> OrderResult:
    return OrderResult(
        order_id=order.order_id, status="COMPLETED", charged=True, brewed=True, receipt_sent=True, amount_cents=cents
    )


async def eventually(check: Callable[[], Any], what: str) -> Any:
    """Poll until check() gives, or awaits to, something truthy (an error means: not yet). The guard is for a hang,
    far above any busy machine's wait."""
    try:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(Exception):
                    if found := await found if inspect.isawaitable(found := check()) else found:
                        return found
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


async def state_is(handle: Handle, status: str) -> None:
    async def reached() -> bool:
        return (await handle.query(OrderCoffeeWorkflow.get_status)).status == status

    await eventually(reached, status)


async def events(handle: Handle) -> list[Any]:
    return list((await handle.fetch_history()).events)


async def cancel(handle: Handle, way: str = "temporal") -> None:
    """Cancel by the signal or by Temporal's cancel, then wait until the workflow has seen it (a workflow task
    completed after it)."""
    await (handle.signal(OrderCoffeeWorkflow.cancel_order) if way == "signal" else handle.cancel())
    kind = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED if way == "signal" else CANCEL_REQUESTED

    async def taken_in() -> bool:
        kinds = [e.event_type for e in await events(handle)]
        return EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in kinds[kinds.index(kind) :]

    await eventually(taken_in, "the cancel taken in")


CANCEL_REQUESTED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED


async def task_failed(handle: Handle) -> bool:
    return EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED in [e.event_type for e in await events(handle)]


def scheduled(history: list[Any]) -> dict[str, Any]:
    """Each activity's scheduled-event attributes, by activity name."""
    return {
        e.activity_task_scheduled_event_attributes.activity_type.name: e.activity_task_scheduled_event_attributes
        for e in history
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }


def record(name: str, history: WorkflowHistory) -> None:
    """With RECORD_HISTORIES=1, keep this ending's history for the replay tests."""
    if os.environ.get("RECORD_HISTORIES"):
        (HISTORIES / f"{name}.json").write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")


def recorded(name: str) -> WorkflowHistory:
    """A history from .histories/, under its own workflow id, order-<its order's id>."""
    text = (HISTORIES / f"{name}.json").read_text()
    given = json.loads(text)["events"][0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"][0]["data"]
    return WorkflowHistory.from_json(f"order-{json.loads(base64.b64decode(given))['order_id']}", text)


async def replay(history: WorkflowHistory, workflow_class: type = OrderCoffeeWorkflow) -> Exception | None:
    replayer = Replayer(workflows=[workflow_class], data_converter=pydantic_data_converter)
    return (await replayer.replay_workflow(history, raise_on_replay_failure=False)).replay_failure


SPAWNED: list[asyncio.subprocess.Process] = []


# coffee.py as it runs on Windows, whose event loops have no signal handlers
WITHOUT_SIGNAL_HANDLERS = (
    "import asyncio, runpy, sys; asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = "
    "asyncio.AbstractEventLoop.add_signal_handler; sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name='__main__')"
)


async def spawn(*args: str, server: str, program: str = str(HERE / "coffee.py")) -> asyncio.subprocess.Process:
    """coffee.py (or another program) run as a user runs it, against this server, in a process group of its own so
    that the test's end takes all it started with it. coffee.py runs with asyncio's signal handlers taken away."""
    process = await asyncio.create_subprocess_exec(
        *([sys.executable, "-c", WITHOUT_SIGNAL_HANDLERS, program] if program.endswith(".py") else [program]),
        *args,
        env={**os.environ, "TEMPORAL_ADDRESS": server},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    SPAWNED.append(process)
    return process


async def run_cli(*args: str, server: str) -> tuple[int, str, str]:
    process = await spawn(*args, server=server)
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def read_until(stream: asyncio.StreamReader | None, text: str) -> str:
    """A process's output, read until a line holds this text."""
    assert stream is not None
    read = ""
    async with asyncio.timeout(60):
        while text not in read:
            line = await stream.readline()
            assert line, f"the process ended before it said {text!r}:\n{read}"
            read += line.decode()
    return read


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(autouse=True)
async def nothing_left_behind() -> AsyncIterator[None]:
    yield
    while SPAWNED:
        process = SPAWNED.pop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


@pytest.fixture(autouse=True)
def within_the_time_limit(request: pytest.FixtureRequest) -> None:
    """pytest-timeout's limit, kept the asyncio way for async tests: a test past it is cancelled, so that its
    `async with` blocks stop what it started, and it fails alone while the run goes on."""
    test, limit = request.node.obj, float(request.config.getini("timeout") or 0)
    if not inspect.iscoroutinefunction(test) or limit <= 0:
        return
    request.node.add_marker(pytest.mark.timeout(0))

    @functools.wraps(test)
    async def bounded(**fixtures: Any) -> None:
        async with asyncio.timeout(limit) as deadline:
            try:
                await test(**fixtures)
            except asyncio.CancelledError:
                if deadline.expired():
                    pytest.fail(f"Timeout: over {limit:g} s", pytrace=False)
                raise

    request.node.obj = bounded


def address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- The models and the payment provider ---
def test_a_medium_latte_costs_450_plus_75_and_a_bigger_cup_costs_more() -> None:
    pricing = coffee.StandardPricingStrategy()
    assert pricing.price_cents("latte", "M") == 450 + 75 == 525
    for drink in ("espresso", "latte", "mocha"):
        assert pricing.price_cents(drink, "S") < pricing.price_cents(drink, "M") < pricing.price_cents(drink, "L")


def test_the_provider_charges_a_key_once_refunds_it_once_and_voids_it_if_it_finds_no_charge(log: Any) -> None:
    provider, p1, p2 = coffee.PaymentService(":memory:"), paying("p1"), paying("p2")
    provider.charge(p1)
    provider.charge(p1)  # an attempt made again, its first reply lost
    with pytest.raises(coffee.PaymentRefused, match="charged, 525 cents"):
        provider.charge(p1.model_copy(update={"cents": 625}))  # the same key for another amount, refused
    with pytest.raises(coffee.PaymentRefused, match="charged, 525 cents"):
        provider.charge(p1.model_copy(update={"first_run_id": "another start"}))  # the id started again, refused
    assert provider.refund(p1.model_copy(update={"first_run_id": "another start"})) == 0  # nor refunded by it
    assert provider.payment("p1")[:2] == ("charged", 525)
    assert provider.refund(p1) == 525 == provider.refund(p1)
    assert provider.payment("p1")[:2] == ("refunded", 525)
    assert provider.refund(p2) == 0  # no charge: the order id is voided, so that a late charge is refused
    with pytest.raises(coffee.PaymentRefused, match="void"):
        provider.charge(p2)
    assert said(log, "p1") == [
        "Charging order p1 for 525 cents", "Charge successful for order p1", "Charging order p1 for 525 cents",
        "Order p1 was charged before", "Charging order p1 for 625 cents",
        "Refused to charge order p1: its payment is charged, 525 cents", "Charging order p1 for 525 cents",
        "Refused to charge order p1: its payment is charged, 525 cents", "Refunded 525 cents for order p1",
    ]  # fmt: skip


def test_the_providers_serve_a_workers_threads_at_once_each_order_once(tmp_path: Path) -> None:
    factory = services(records=str(tmp_path / "records.sqlite3"))  # one file, as the worker's threads share it
    refused: list[Exception] = []

    def orders(thread: int) -> None:
        for n in range(40):
            payment = paying(f"o{thread}-{n}")
            try:
                factory.payment.charge(payment)
                factory.notification.send_receipt(payment)
                assert factory.payment.refund(payment) == 525 if n % 2 else factory.payment.payment(payment.order_id)
            except Exception as err:
                refused.append(err)

    threads = [threading.Thread(target=orders, args=(thread,)) for thread in range(coffee.ACTIVITY_SLOTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused == []
    assert factory.payment.payment("o3-1")[:2] == ("refunded", 525) and factory.payment.payment("o3-2")[:2] == (
        "charged",
        525,
    )


# --- The activities, through ActivityEnvironment ---
async def test_a_jam_is_an_expected_failure_that_the_retry_policy_retries(log: Any) -> None:
    brew = coffee.CoffeeActivities(services(brew_failure_rate=1.0)).brew_coffee
    with pytest.raises(ApplicationError) as jammed:
        await ActivityEnvironment().run(brew, OrderRequest(order_id="a1", drink="latte", size="M"))
    assert (jammed.value.type, jammed.value.non_retryable) == ("BrewMachineJammed", False)
    assert jammed.value.category == ApplicationErrorCategory.BENIGN  # logged by the SDK without a traceback
    assert ("ERROR", "Brew machine jammed for order a1!") in [(r.levelname, r.getMessage()) for r in log.records]


# --- The workflow, on the time-skipping server ---
async def test_an_order_whose_first_brew_jams_logs_the_seed_lines_and_ends_charged_once_with_one_coffee(
    time_skipping: WorkflowEnvironment, log: Any
) -> None:
    factory, order = services(), new_order()
    factory.brewing = FirstBrewJams()
    handle, result = await run_order(time_skipping, factory, order)
    assert result == completed(order)
    o = order.order_id
    assert said(log, order) == [  # SEED.md's example, word for word
        f"Charging order {o} for 525 cents", f"Charge successful for order {o}", f"Brewing latte (M) for order {o}",
        f"Brew machine jammed for order {o}!", f"Brewing latte (M) for order {o}", f"Brew complete for order {o}",
        f"Sending receipt for order {o}", f"Receipt sent for order {o}",
    ]  # fmt: skip
    assert factory.payment.payment(o)[:2] == ("charged", 525)
    history = await handle.fetch_history()
    steps = scheduled(list(history.events))
    assert set(steps) == {"price_order", "charge_customer", "brew_coffee", "send_receipt"}
    for step in steps.values():  # the seed's retry policy, and a timeout, on every step
        policy = step.retry_policy
        assert (policy.maximum_attempts, policy.initial_interval.seconds, policy.backoff_coefficient) == (5, 1, 2.0)
        assert step.start_to_close_timeout.seconds > 0
    assert steps["brew_coffee"].heartbeat_timeout.seconds == coffee.BREW["heartbeat_timeout"].seconds  # type: ignore[union-attr]
    record("completed-after-a-jam", history)


async def test_five_jams_fail_the_order_and_refund_the_charge_once(
    time_skipping: WorkflowEnvironment, log: Any
) -> None:
    factory, order = services(brew_failure_rate=1.0), new_order()
    handle, result = await run_order(time_skipping, factory, order)
    history = await handle.fetch_history()
    assert result == OrderResult(
        order_id=order.order_id, status="FAILED", charged=True, refunded=True, amount_cents=525,
        last_error=f"BrewMachineJammed: Brew machine jammed for order {order.order_id}!",
    )  # fmt: skip
    assert tally(log, order) == {"charges": 1, "coffees": 0, "receipts": 0, "refunds": 1}
    assert count(said(log, order), "Brewing") == 5
    assert factory.payment.payment(order.order_id)[:2] == ("refunded", 525)
    assert scheduled(list(history.events))["refund_customer"].retry_policy.maximum_attempts == 0  # until it lands
    record("failed-after-five-jams", history)


class ReceiptsBounce(NotificationService):
    def send_receipt(self, payment: Payment) -> None:
        raise ConnectionError("mail server down")


async def test_a_lost_receipt_does_not_undo_a_coffee_made_and_paid_for(time_skipping: WorkflowEnvironment) -> None:
    factory, order = services(), new_order()
    factory.notification = ReceiptsBounce(":memory:")
    _, result = await run_order(time_skipping, factory, order)
    lost = {"receipt_sent": False, "last_error": "ConnectionError: mail server down"}
    assert result == completed(order).model_copy(update=lost)
    assert factory.payment.payment(order.order_id)[:2] == ("charged", 525)


async def test_a_refused_charge_fails_the_order_at_once_without_a_refund(
    time_skipping: WorkflowEnvironment, log: Any
) -> None:
    factory, order = services(), new_order()
    factory.payment.refund(paying(order.order_id))  # this order id was used before, and its payment voided
    handle, result = await run_order(time_skipping, factory, order)
    assert (result.status, result.charged, result.refunded, result.amount_cents) == ("FAILED", False, False, 525)
    assert "void" in (result.last_error or "")
    assert count(said(log, order), "Charging") == 1  # not retried
    history = await handle.fetch_history()
    assert set(scheduled(list(history.events))) == {"price_order", "charge_customer"}
    record("refused", history)


async def test_a_charge_retried_on_a_release_with_new_prices_keeps_the_price_the_order_was_given(
    time_skipping: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch, log: Any
) -> None:
    class ReplyLostThenPricesRise(coffee.PaymentService):
        def charge(self, payment: Payment) -> None:
            super().charge(payment)
            prices = coffee.StandardPricingStrategy.SURCHARGE_CENTS
            if prices["latte"] == 75:  # the charge landed, but its reply is lost, and a release raises the prices
                monkeypatch.setitem(prices, "latte", 175)
                raise ConnectionError("reply lost")

    class Receipts(NotificationService):
        cents: ClassVar[list[int]] = []

        def send_receipt(self, payment: Payment) -> None:
            self.cents.append(payment.cents)

    factory, order = services(), new_order()
    factory.payment, factory.notification = ReplyLostThenPricesRise(":memory:"), Receipts(":memory:")
    assert (await run_order(time_skipping, factory, order))[1] == completed(order)
    assert factory.payment.payment(order.order_id)[:2] == ("charged", 525)
    assert Receipts.cents == [525]


@pytest.mark.parametrize("way", ["signal", "temporal"])
async def test_a_cancel_before_the_charge_moves_no_money(time_skipping: WorkflowEnvironment, way: str) -> None:
    factory, order = services(), new_order()
    handle = await coffee.start_order(time_skipping.client, order)  # no worker yet: it waits to be charged
    await (handle.signal(OrderCoffeeWorkflow.cancel_order) if way == "signal" else handle.cancel())
    async with coffee.new_worker(time_skipping.client, factory):
        if way == "signal":
            result = await handle.result()
            assert (result.status, result.charged, result.refunded) == ("CANCELLED", False, False)
        else:
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
            assert isinstance(failure.value.cause, CancelledError)
        history = await handle.fetch_history()
    assert set(scheduled(list(history.events))) == {"price_order"}
    assert factory.payment.payment(order.order_id)[:2] == ("none", 0)


class FirstChargeStuckOnTheWire(coffee.PaymentService):
    """A provider whose first charge hangs past the step's timeout and lands only when the test says; the others
    fail (the order gives up) or go through (the order is cancelled meanwhile)."""

    def __init__(self, later_ones_fail: bool) -> None:
        super().__init__(":memory:")
        self.later_ones_fail, self.calls = later_ones_fail, 0
        self.on_the_wire, self.let_it_land, self.landed = threading.Event(), threading.Event(), threading.Event()

    def charge(self, payment: Payment) -> None:
        self.calls += 1
        if self.calls > 1:
            if self.later_ones_fail:
                raise ConnectionError("payment provider unavailable")
            return super().charge(payment)
        self.on_the_wire.set()
        self.let_it_land.wait(60)
        try:
            super().charge(payment)
        finally:
            self.landed.set()


@pytest.mark.parametrize("ending, money", [("gave up", ("void", 0)), ("signal", ("refunded", 525))])
async def test_a_charge_that_lands_after_its_timeout_is_never_kept(
    time_skipping: WorkflowEnvironment, ending: str, money: tuple[str, int]
) -> None:
    factory, order = services(), new_order()
    factory.payment = provider = FirstChargeStuckOnTheWire(later_ones_fail=ending == "gave up")
    async with coffee.new_worker(time_skipping.client, factory):
        handle = await coffee.start_order(time_skipping.client, order)
        try:
            assert await asyncio.to_thread(provider.on_the_wire.wait, 30)
            if ending == "signal":
                await handle.signal(OrderCoffeeWorkflow.cancel_order)
            result = await handle.result()  # past the 10 s timeout and the back-off, skipped
        finally:
            provider.let_it_land.set()
        assert await asyncio.to_thread(provider.landed.wait, 30)
    assert result.status == ("FAILED" if ending == "gave up" else "CANCELLED")
    assert provider.payment(order.order_id)[:2] == money  # the late charge was refused: net 0
    assert (result.charged, result.refunded, result.amount_cents) == (money[1] > 0, money[1] > 0, 525)


async def test_a_receipt_whose_reply_comes_after_the_timeout_reaches_the_customer_once(
    time_skipping: WorkflowEnvironment, log: Any
) -> None:
    replied = threading.Event()

    class FirstReplyLate(NotificationService):  # the receipt goes out at once; its first reply, after the timeout
        def send_receipt(self, payment: Payment) -> None:
            super().send_receipt(payment)
            if count(said(log, payment.order_id), "Sending receipt") == 1:
                replied.wait(60)

    factory, order = services(), new_order()
    factory.notification = FirstReplyLate(":memory:")
    async with coffee.new_worker(time_skipping.client, factory):
        try:
            result = await (await coffee.start_order(time_skipping.client, order)).result()  # 10 s skipped
        finally:
            replied.set()
    assert result == completed(order)  # receipt_sent, as it was
    assert tally(log, order)["receipts"] == 1 and count(said(log, order), "was sent before") == 1


@pytest.mark.parametrize("way", ["signal", "temporal"])
async def test_a_cancel_after_the_brew_comes_too_late_and_the_order_completes(
    time_skipping: WorkflowEnvironment, way: str
) -> None:
    sending, sent = threading.Event(), threading.Event()

    class HeldReceipt(NotificationService):
        def send_receipt(self, payment: Payment) -> None:
            sending.set()
            sent.wait(30)
            super().send_receipt(payment)

    factory, order = services(), new_order()
    factory.notification = HeldReceipt(":memory:")
    async with coffee.new_worker(time_skipping.client, factory):
        handle = await coffee.start_order(time_skipping.client, order)
        assert await asyncio.to_thread(sending.wait, 30)
        await cancel(handle, way)
        sent.set()
        assert await handle.result() == completed(order)
    assert factory.payment.payment(order.order_id)[:2] == ("charged", 525)


async def test_temporals_cancel_does_not_stop_a_refund_that_is_retrying(time_skipping: WorkflowEnvironment) -> None:
    class RefundFailsTwice(coffee.PaymentService):
        attempts, retrying, cancelled = 0, threading.Event(), threading.Event()

        def refund(self, payment: Payment) -> int:
            RefundFailsTwice.attempts += 1
            if self.attempts == 2:  # the second attempt fails only once Temporal's cancel has been taken in
                self.retrying.set()
                self.cancelled.wait(30)
            if self.attempts <= 2:
                raise ConnectionError("payment provider unavailable")
            return super().refund(payment)

    factory, order = services(brew_failure_rate=1.0), new_order()
    factory.payment = RefundFailsTwice(":memory:")
    async with coffee.new_worker(time_skipping.client, factory):
        handle = await coffee.start_order(time_skipping.client, order)
        result = asyncio.create_task(handle.result())  # while the test waits for it, the server skips time
        assert await asyncio.to_thread(RefundFailsTwice.retrying.wait, 30)
        await cancel(handle)
        RefundFailsTwice.cancelled.set()
        assert (await result).status == "FAILED"  # it failed before the cancel came, and was refunded even so
    assert factory.payment.payment(order.order_id)[:2] == ("refunded", 525)


# --- Orders started by other clients: one workflow per order id, whoever starts it ---
def as_json(text: str) -> RawValue:
    """A workflow input as another client may send it: JSON, as it is."""
    return RawValue(Payload(metadata={"encoding": b"json/plain"}, data=text.encode()))


@pytest.mark.parametrize(
    "workflow_id, order",
    [
        ("order-x2-{}", '{{"order_id": "b2-{}", "drink": "latte", "size": "M"}}'),  # another order's workflow id
        ("order-j8-{}", '{{"order_id": "j8-{0}", "drink": "latte", "size": "M", "order_id": "j9-{0}"}}'),  # j9's
    ],
)
async def test_an_order_under_another_workflow_id_fails_at_once_with_nothing_charged(
    time_skipping: WorkflowEnvironment, workflow_id: str, order: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    async with coffee.new_worker(time_skipping.client, services()):
        handle = await time_skipping.client.start_workflow(
            "OrderCoffeeWorkflow", as_json(order.format(tag)), id=workflow_id.format(tag), task_queue=coffee.TASK_QUEUE
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    assert "runs only as workflow order-" in str(failure.value.cause)
    assert scheduled(await events(handle)) == {}


async def test_a_finished_order_started_again_by_another_client_is_refused_and_the_first_ones_money_stands(
    time_skipping: WorkflowEnvironment, log: Any
) -> None:
    factory, order = services(), new_order()
    async with coffee.new_worker(time_skipping.client, factory):
        first = await coffee.start_order(time_skipping.client, order)
        assert await first.result() == completed(order)
        # As the temporal CLI starts it, with the reuse policy it has by default: a second run of order-<ID>.
        again = await time_skipping.client.start_workflow(
            OrderCoffeeWorkflow.run, order, id=first.id, task_queue=coffee.TASK_QUEUE
        )
        result = await again.result()
    assert (result.status, result.charged, result.brewed, result.refunded) == ("FAILED", False, False, False)
    assert "has a payment (charged, 525 cents)" in (result.last_error or "")
    assert tally(log, order) == {"charges": 1, "coffees": 1, "receipts": 1, "refunds": 0}
    assert factory.payment.payment(order.order_id)[:2] == ("charged", 525)


async def test_an_order_placed_before_by_another_client_is_told_apart_by_what_was_ordered(
    dev_server: WorkflowEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    client, latte, odd = dev_server.client, new_order(), new_order()
    mocha = latte.model_copy(update={"drink": "mocha"})
    others = [  # started by another client, with none of coffee.py's ways: no worker needed
        await client.start_workflow("OrderCoffeeWorkflow", mocha, id=f"order-{latte.order_id}", task_queue="elsewhere"),
        await client.start_workflow("OrderCoffeeWorkflow", as_json('{"x": 1}'), id=f"order-{odd.order_id}",
                                    task_queue="elsewhere"),
    ]  # fmt: skip
    for order in (latte, odd):
        with pytest.raises(coffee.CommandError, match="was placed before, for another drink or size"):
            await coffee.start_order(client, order)
    found = await asyncio.gather(*[coffee.start_order(client, mocha) for _ in range(2)])  # at once: both find it
    assert [handle.id for handle in found] == [others[0].id] * 2
    assert capsys.readouterr().err.count("was placed before: this is it; nothing new is charged") == 2
    for other in others:
        await other.terminate()


# --- Recorded histories: the orders of this edition must still replay after any change ---
@pytest.mark.parametrize("name", sorted(p.stem for p in HISTORIES.glob("*.json")))
async def test_orders_recorded_by_this_edition_still_replay(name: str) -> None:
    assert await replay(recorded(name)) is None


def test_a_history_is_kept_for_each_way_an_order_ends() -> None:
    assert {p.stem for p in HISTORIES.glob("*.json")} == {
        "completed-after-a-jam", "failed-after-five-jams", "refused", "cancelled-by-the-signal",
        "cancelled-through-temporal",
    }  # fmt: skip


@workflow.defn(name="OrderCoffeeWorkflow")
class WithAThankYouNote(OrderCoffeeWorkflow):
    """A step added after the receipt, as coffee.py's comment says: behind workflow.patched."""

    @workflow.run
    async def run(self, order: OrderRequest) -> OrderResult:
        return await super().run(order)

    def _end(self, status: Any) -> OrderResult:
        if status == "COMPLETED" and self.new_step_runs():
            workflow.start_activity("send_thank_you", start_to_close_timeout=timedelta(seconds=10))
        return super()._end(status)

    def new_step_runs(self) -> bool:
        return workflow.patched("thank-you-note")


@workflow.defn(name="OrderCoffeeWorkflow")
class WithAnUnguardedThankYouNote(WithAThankYouNote):
    @workflow.run
    async def run(self, order: OrderRequest) -> OrderResult:
        return await super().run(order)

    def new_step_runs(self) -> bool:
        return True


@pytest.mark.parametrize("changed, replays", [(WithAThankYouNote, True), (WithAnUnguardedThankYouNote, False)])
async def test_a_new_step_keeps_running_orders_replayable_only_behind_workflow_patched(
    changed: type, replays: bool
) -> None:
    failure = await replay(recorded("completed-after-a-jam"), changed)
    assert failure is None if replays else isinstance(failure, NondeterminismError), failure


# --- The workflow, on a dev server: real time ---
@pytest.mark.parametrize("way", ["signal", "temporal"])
async def test_a_cancel_mid_brew_stops_the_brew_then_refunds(
    dev_server: WorkflowEnvironment, way: str, log: Any
) -> None:
    factory, order = services(brew_seconds=60), new_order()
    async with coffee.new_worker(dev_server.client, factory):
        handle = await coffee.start_order(dev_server.client, order)
        await state_is(handle, "BREWING")
        state = await handle.query(OrderCoffeeWorkflow.get_status)  # the query reads the order while it brews
        assert (state.charged, state.amount_cents, state.cancel_requested) == (True, 525, False)
        started = time.monotonic()
        if way == "signal":
            await handle.signal(OrderCoffeeWorkflow.cancel_order)
            result = await handle.result()
        else:
            await handle.cancel()
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
            assert isinstance(failure.value.cause, CancelledError)
            assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
            result = await handle.query(OrderCoffeeWorkflow.get_status)
        stopped_after = time.monotonic() - started
        record(f"cancelled-{'by-the-signal' if way == 'signal' else 'through-temporal'}", await handle.fetch_history())
    assert (result.status, result.charged, result.refunded, result.brewed) == ("CANCELLED", True, True, False)
    assert tally(log, order) == {"charges": 1, "coffees": 0, "receipts": 0, "refunds": 1}
    lines = [line.split(" for order")[0] for line in said(log, order)]
    assert lines.index("Brew stopped") < lines.index("Refunded 525 cents")  # the refund waited for the brew to stop
    assert factory.payment.payment(order.order_id)[:2] == ("refunded", 525)
    assert stopped_after < 15  # a heartbeat's reply brought it; far sooner, on an idle machine


async def test_temporals_cancel_mid_charge_lets_the_charge_land_then_refunds_it(
    dev_server: WorkflowEnvironment, log: Any
) -> None:
    class HeldCharge(coffee.PaymentService):
        on_the_wire, let_it_land = threading.Event(), threading.Event()

        def charge(self, payment: Payment) -> None:
            self.on_the_wire.set()
            self.let_it_land.wait(60)
            super().charge(payment)

    factory, order = services(), new_order()
    factory.payment = HeldCharge(":memory:")
    async with coffee.new_worker(dev_server.client, factory):
        handle = await coffee.start_order(dev_server.client, order)
        assert await asyncio.to_thread(HeldCharge.on_the_wire.wait, 30)
        await cancel(handle)
        HeldCharge.let_it_land.set()
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    assert factory.payment.payment(order.order_id)[:2] == ("refunded", 525)
    assert count(said(log, order), "Brewing") == 0


class BrewMochasSlowly(BrewService):
    async def brew(self, order: OrderRequest, heartbeat: Callable[[], None]) -> None:
        self.seconds = 10 if order.drink == "mocha" else 0
        await super().brew(order, heartbeat)


@slow_first
async def test_slow_blocking_payment_and_receipt_calls_never_cost_a_brew_its_heartbeats(
    dev_server: WorkflowEnvironment, log: Any
) -> None:
    class SlowPayments(coffee.PaymentService):
        def charge(self, payment: Payment) -> None:
            time.sleep(4.5 if payment.order_id == latte.order_id else 0)  # longer than the brew's heartbeat timeout
            super().charge(payment)

    class SlowReceipts(NotificationService):
        def send_receipt(self, payment: Payment) -> None:
            time.sleep(4.5 if payment.order_id == latte.order_id else 0)  # an SMTP call, say
            super().send_receipt(payment)

    factory, mocha, latte = services(), new_order("mocha", "L"), new_order()
    factory.brewing, factory.notification, factory.payment = BrewMochasSlowly(0, 0), SlowReceipts(""), SlowPayments("")
    async with coffee.new_worker(dev_server.client, factory):
        brewing = await coffee.start_order(dev_server.client, mocha)
        await state_is(brewing, "BREWING")
        meanwhile = await coffee.start_order(dev_server.client, latte)  # its slow calls run while the mocha brews
        assert await meanwhile.result() == completed(latte)
        assert await brewing.result() == completed(mocha, 650)
    assert count(said(log, mocha), "Brewing") == 1  # never taken for dead, never brewed again


@slow_first
async def test_a_slow_provider_under_load_charges_each_order_once_with_one_coffee_and_one_receipt(
    dev_server: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch, log: Any
) -> None:
    monkeypatch.setattr(coffee, "ACTIVITY_SLOTS", 2)  # two threads: of three charges at once, one must wait

    class SlowProvider(coffee.PaymentService):  # a provider during an incident: 6 s a charge, of the step's 10 s
        def charge(self, payment: Payment) -> None:
            time.sleep(6)
            super().charge(payment)

    factory, orders = services(), [new_order() for _ in range(3)]
    factory.payment = SlowProvider(":memory:")
    async with coffee.new_worker(dev_server.client, factory):
        handles = [await coffee.start_order(dev_server.client, order) for order in orders]
        assert [await handle.result() for handle in handles] == [completed(order) for order in orders]
    for order in orders:  # the third's timeout ran only once it had a thread: no attempt timed out while it waited
        assert count(said(log, order), "Charging") == 1
        assert tally(log, order) == {"charges": 1, "coffees": 1, "receipts": 1, "refunds": 0}


@slow_first
async def test_a_worker_killed_mid_brew_hands_the_order_to_the_next_one_charged_once(
    dev_server: WorkflowEnvironment, cli: None, tmp_path: Path, log: Any
) -> None:
    payments = str(tmp_path / "payments.sqlite3")
    first = await spawn("worker", "--brew-seconds", "30", "--records", payments, server=address(dev_server))
    order = new_order()
    handle = await coffee.start_order(dev_server.client, order)
    first_log = await read_until(first.stderr, f"Brewing latte (M) for order {order.order_id}")
    first.kill()  # kill -9: nothing handed back
    await first.wait()
    factory = services(records=payments)
    async with coffee.new_worker(dev_server.client, factory):
        assert await handle.result() == completed(order)
    assert count(first_log.splitlines(), "Charge successful") == 1 and count(said(log, order), "Charging") == 0
    assert factory.payment.payment(order.order_id)[:2] == ("charged", 525)
    started = [e.activity_task_started_event_attributes for e in await events(handle)]
    retried = [s for s in started if s.attempt == 2]
    assert len(retried) == 1 and "Heartbeat timeout" in retried[0].last_failure.message


@slow_first
async def test_an_order_outlives_a_restart_of_a_server_that_keeps_its_state(tmp_path: Path, log: Any) -> None:
    port, temporal = free_port(), beside_python("temporal")
    assert temporal
    command = ["server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port)]
    command += ["--db-filename", str(tmp_path / "temporal.db"), "--log-level", "error"]

    async def start_server() -> asyncio.subprocess.Process:
        server = await spawn(*command, server="", program=temporal)
        await eventually(lambda: port_open(port), "the server's port open")
        return server

    server = await start_server()
    connecting = lambda: Client.connect(f"127.0.0.1:{port}", data_converter=pydantic_data_converter)  # noqa: E731
    client = await eventually(connecting, "a client connected, once the server's frontend is up")
    factory, order = services(), new_order()
    factory.brewing = FirstBrewJams()
    async with coffee.new_worker(client, factory):
        handle = await coffee.start_order(client, order)
        await eventually(lambda: "jammed" in " ".join(said(log, order)), "the first jam")
        server.kill()  # as a crash stops it, during the back-off before the brew's retry
        await server.wait()
        await start_server()
        assert await handle.result() == completed(order)
    assert tally(log, order) == {"charges": 1, "coffees": 1, "receipts": 1, "refunds": 0}


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


@workflow.defn(name="OrderCoffeeWorkflow")
class BugAtTheEnd(OrderCoffeeWorkflow):
    """The workflow with a bug, as a careless change might bring."""

    @workflow.run
    async def run(self, order: OrderRequest) -> OrderResult:
        return await super().run(order)

    def _end(self, status: Any) -> OrderResult:
        raise KeyError("a bug")


@activity.defn(name="brew_coffee")
async def brew_that_returns_a_number(order: OrderRequest) -> int:
    return 1  # a bug: brew_coffee returns nothing


@pytest.mark.parametrize("bug", ["in the workflow", "in a step's result", "in the order"])
async def test_a_bug_pauses_the_order_with_no_money_lost_until_a_fixed_worker_carries_it_on(
    dev_server: WorkflowEnvironment, bug: str, log: Any
) -> None:
    factory, order = services(), new_order()
    shop = coffee.CoffeeActivities(factory)
    brew = brew_that_returns_a_number if bug == "in a step's result" else shop.brew_coffee
    given = (
        as_json(f'{{"order_id": "{order.order_id}", "drink": "tea", "size": "M"}}') if bug == "in the order" else order
    )
    async with coffee.Worker(
        dev_server.client, task_queue=coffee.TASK_QUEUE, activity_executor=coffee.ThreadPoolExecutor(),
        workflows=[BugAtTheEnd if bug == "in the workflow" else OrderCoffeeWorkflow],
        activities=[shop.price_order, shop.charge_customer, brew, shop.send_receipt, shop.refund_customer],
    ):  # fmt: skip
        handle = await dev_server.client.start_workflow(
            "OrderCoffeeWorkflow", given, id=f"order-{order.order_id}", task_queue=coffee.TASK_QUEUE
        )
        await eventually(lambda: task_failed(handle), "a failed workflow task")
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING  # paused: neither failed nor refunded
    assert factory.payment.payment(order.order_id)[:2] == (("none", 0) if bug == "in the order" else ("charged", 525))
    if bug != "in the workflow":  # a fix there would need a reset, or a code change to the order's input
        return await handle.terminate()
    async with coffee.new_worker(dev_server.client, factory):  # the fix, deployed
        assert OrderResult.model_validate(await handle.result()) == completed(order)
    assert tally(log, order) == {"charges": 1, "coffees": 1, "receipts": 1, "refunds": 0}


# --- The command line, as a user runs it ---
def latte_args(order_id: str, *more: str) -> list[str]:
    return ["order", "--order-id", order_id, "--drink", "latte", "--size", "M", *more]


async def test_order_prints_each_state_when_asked_then_the_seed_result(
    dev_server: WorkflowEnvironment, cli: None
) -> None:
    order = new_order()
    async with coffee.new_worker(dev_server.client, services(brew_seconds=1)):
        code, out, err = await run_cli(*latte_args(order.order_id, "--query"), server=address(dev_server))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    states = [json.loads(line)["status"] for line in lines[: lines.index("{")]]
    assert "BREWING" in states and states == sorted(set(states), key=states.index)  # each state once, in order
    assert list(json.loads("\n".join(lines[lines.index("{") :])).items()) == [
        ("order_id", order.order_id), ("status", "COMPLETED"), ("charged", True), ("brewed", True),
        ("receipt_sent", True), ("amount_cents", 525), ("refunded", False), ("last_error", None),
    ]  # fmt: skip


async def test_order_placed_again_finds_the_order_and_charges_nothing_new(
    dev_server: WorkflowEnvironment, cli: None, log: Any
) -> None:
    order, server = new_order(), address(dev_server)
    async with coffee.new_worker(dev_server.client, services()):
        first = await run_cli(*latte_args(order.order_id), server=server)
        again = await run_cli(*latte_args(order.order_id), server=server)
    other = await run_cli("order", "--order-id", order.order_id, "--drink", "mocha", "--size", "M", server=server)
    assert first[:2] == again[:2] and first[0] == 0  # the same result, and stdout JSON alone
    assert again[2] == f"Order {order.order_id} was placed before: this is it; nothing new is charged.\n"
    assert other == (1, "", f"coffee.py: order {order.order_id} was placed before, for another drink or size\n")
    assert count(said(log, order), "Charging") == 1


async def test_order_cancel_after_refunds_a_brewing_espresso(dev_server: WorkflowEnvironment, cli: None) -> None:
    order, factory = new_order("espresso", "S"), services(brew_seconds=30)
    async with coffee.new_worker(dev_server.client, factory):
        args = ["order", "--order-id", order.order_id, "--drink", "espresso", "--size", "S", "--cancel-after", "1"]
        code, out, err = await run_cli(*args, server=address(dev_server))
    assert (code, err) == (0, "")
    result = OrderResult.model_validate_json(out)
    assert (result.status, result.brewed, result.refunded, result.amount_cents) == ("CANCELLED", False, True, 350)
    assert factory.payment.payment(order.order_id)[:2] == ("refunded", 350)


async def test_order_says_that_temporal_cancelled_the_order_and_refunded_it(
    dev_server: WorkflowEnvironment, cli: None
) -> None:
    order, factory = new_order(), services(brew_seconds=30)
    async with coffee.new_worker(dev_server.client, factory):
        placing = asyncio.create_task(run_cli(*latte_args(order.order_id), server=address(dev_server)))
        handle = dev_server.client.get_workflow_handle_for(OrderCoffeeWorkflow.run, f"order-{order.order_id}")
        await state_is(handle, "BREWING")
        temporal = beside_python("temporal")
        assert temporal
        operator = await spawn("workflow", "cancel", "-w", handle.id, "--address", address(dev_server), server="",
                               program=temporal)  # fmt: skip
        assert await operator.wait() == 0
        code, out, err = await placing
    show = f"`temporal workflow show -w {handle.id}`"
    assert (code, out, err) == (0, f"Order {order.order_id} was cancelled through Temporal; any charge was refunded. "
                                   f"See {show}.\n", "")  # fmt: skip
    assert factory.payment.payment(order.order_id)[:2] == ("refunded", 525)


async def test_order_exits_1_and_says_why_when_the_order_fails(time_skipping: WorkflowEnvironment, cli: None) -> None:
    order = new_order()
    async with coffee.new_worker(time_skipping.client, services(brew_failure_rate=1.0)):
        placing = asyncio.create_task(run_cli(*latte_args(order.order_id), server=address(time_skipping)))
        handle = time_skipping.client.get_workflow_handle(f"order-{order.order_id}")
        await eventually(lambda: handle.describe(), "the order placed")
        await time_skipping.sleep(timedelta(seconds=60))  # skips the back-off between the five brews
        code, out, err = await placing
    assert code == 1
    assert OrderResult.model_validate_json(out).status == "FAILED"
    assert err == f"Order {order.order_id} failed: BrewMachineJammed: Brew machine jammed for order {order.order_id}!\n"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
async def test_the_worker_process_serves_orders_by_its_flags_and_stops_in_one_line(
    dev_server: WorkflowEnvironment, cli: None, tmp_path: Path, stop: int
) -> None:
    payments, order = str(tmp_path / "payments.sqlite3"), new_order()
    worker = await spawn("worker", "--brew-seconds", "0", "--records", payments, server=address(dev_server))
    assert await (await coffee.start_order(dev_server.client, order)).result() == completed(order)
    assert coffee.PaymentService(payments).payment(order.order_id)[:2] == ("charged", 525)
    worker.send_signal(stop)
    async with asyncio.timeout(30):
        _out, err = await worker.communicate()
    assert worker.returncode == 130 and "Traceback" not in err.decode()
    assert f"Worker {worker.pid} polling task queue 'coffee-orders'" in err.decode()
    assert err.decode().splitlines()[-1] == "coffee.py: stopped"


async def test_ctrl_c_once_or_twice_stops_order_in_one_line_and_leaves_the_order_running(
    dev_server: WorkflowEnvironment, cli: None
) -> None:
    order = new_order()
    placing = await spawn(*latte_args(order.order_id), server=address(dev_server))  # no worker: it waits
    handle = dev_server.client.get_workflow_handle_for(OrderCoffeeWorkflow.run, f"order-{order.order_id}")
    await eventually(lambda: handle.describe(), "the order placed")
    placing.send_signal(signal.SIGINT)
    with contextlib.suppress(ProcessLookupError):
        placing.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        out, err = await placing.communicate()
    assert (placing.returncode, out, err.decode()) == (
        130,
        b"",
        f"coffee.py: stopped; order {order.order_id} goes on\n",
    )
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    await handle.terminate()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["order", "--order-id", "1", "--drink", "tea", "--size", "M"], 2, "invalid choice: 'tea'"),
        (["order", "--order-id", "1", "--drink", "latte"], 2, "the following arguments are required: --size"),
        (["worker", "--brew-seconds", "soon"], 2, "invalid seconds value: 'soon'"),
        (["worker", "--brew-seconds", "-1"], 2, "argument --brew-seconds: -1 is not 0 or more"),
        (["worker", "--brew-failure-rate", "1.5"], 2, "argument --brew-failure-rate: 1.5 is not from 0 to 1"),
        (["order", "--order-id", "1", "--drink", "latte", "--size", "M", "--cancel-after", "-1"], 2, "-1 is not 0 or"),
        (["order", "--order-id", "a b", "--drink", "latte", "--size", "M"], 1, "coffee.py: invalid order_id:"),
    ],
)
def test_a_bad_flag_gets_one_line_and_a_non_zero_exit(
    capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    try:
        exit_code = coffee.main(args)
    except SystemExit as exit:  # argparse's way: its usage, then one line
        exit_code = exit.code
    out, err = capsys.readouterr()
    assert (exit_code, out) == (code, "") and message in err.splitlines()[-1] and "Traceback" not in err


def test_no_server_gets_one_line_that_says_how_to_start_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    for args in (["worker", "--records", ":memory:"], latte_args("n1")):
        assert coffee.main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("coffee.py: no Temporal server answered at 127.0.0.1:")
        assert "start one with `temporal server start-dev`, or run coffee.py's demo, which needs none" in err


def test_a_ledger_path_that_cannot_be_used_gets_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert coffee.main(["worker", "--records", str(tmp_path / "no" / "such.sqlite3")]) == 1
    err = capsys.readouterr().err
    assert err == f"coffee.py: cannot keep records in {tmp_path}/no/such.sqlite3: unable to open database file\n"
    monkeypatch.setattr(coffee.tempfile, "gettempdir", lambda: str(tmp_path / "no"))  # the demo's, in the temp folder
    assert coffee.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"coffee.py: cannot keep records in {tmp_path}/no/coffee-records.sqlite3: unable to open database file\n"
    )


def test_the_script_metadata_names_the_packages_that_requirements_txt_pins() -> None:
    text = (HERE / "coffee.py").read_text()
    metadata = tomllib.loads("\n".join(line[2:] for line in text.split("# ///")[1].splitlines()[2:]))
    required = (HERE / "requirements.txt").read_text().splitlines()
    assert set(metadata["dependencies"]) <= set(required)
    assert [line.split(">=")[0] for line in metadata["dependencies"]] == ["temporalio", "pydantic"]


def test_a_config_file_that_cannot_be_read_gets_one_line_that_shows_none_of_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text('[profile.default]\naddress = "localhost:7233"\napi_key = "sk-secret-1234\n')  # unclosed
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(config))
    assert coffee.main(latte_args("c1")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"coffee.py: cannot read {config}: ") and "line 3" in err
    assert err.count("\n") == 1 and "secret" not in err


@pytest.mark.parametrize(
    "python_lacks, says",
    [
        ("sys.version_info = (3, 10, 13)", "coffee.py needs Python 3.11 or newer: run `uv run coffee.py demo`"),
        ("sys.modules['temporalio'] = None", "coffee.py needs temporalio: run `uv run coffee.py demo`, or `pip "),
    ],
)
async def test_a_python_that_cannot_run_it_gets_one_line_that_says_what_to_run(python_lacks: str, says: str) -> None:
    code = f"import runpy, sys; {python_lacks}; runpy.run_path({str(HERE / 'coffee.py')!r}, run_name='__main__')"
    process = await spawn("-c", code, "demo", server="", program=sys.executable)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert (process.returncode, out) == (1, b"")
    assert err.decode().startswith(says) and err.decode().count("\n") == 1


# --- The demo ---
@slow_first
async def test_the_demo_shows_four_orders_and_a_crash_then_leaves_nothing_running() -> None:
    demo = await spawn("demo", server="127.0.0.1:1")  # it starts a dev server of its own, whatever is configured
    async with asyncio.timeout(150):
        out, err = await demo.communicate()
    text = out.decode()
    assert demo.returncode == 0, err.decode()
    assert not group_alive(demo.pid), "the demo left a process running"
    assert "Brew machine jammed for order latte-" in err.decode() and "Traceback" not in err.decode()
    results = [
        OrderResult.model_validate_json(line.split("result: ")[1]) for line in text.splitlines() if "result: " in line
    ]
    assert [(r.status, r.amount_cents, r.refunded) for r in results] == [
        ("COMPLETED", 525, False), ("COMPLETED", 650, False), ("CANCELLED", 350, True), ("COMPLETED", 525, False)
    ]  # fmt: skip
    assert text.count("the payment provider's record: charged, ") == 3 and "record: refunded, 350 cents" in text
    assert "get_status: BREWING" in text
    assert "polling task queue 'coffee-orders'" in err.decode()  # order 4's worker, the process it killed
    assert "Brewing latte (M) for order crash-" in err.decode()
    assert "brew_coffee's attempt 2 started, after: activity Heartbeat timeout" in text
    assert os.access(text.splitlines()[-3].split()[0], os.X_OK)  # the CLI it ran on, as a command that runs
    coffee_py = text.splitlines()[-2].strip()
    assert coffee_py.endswith(" worker") and text.splitlines()[-1].strip().startswith(coffee_py.removesuffix("worker"))


def test_a_demo_with_no_temporal_cli_to_run_or_download_gets_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def offline(**_: Any) -> None:  # as the SDK fails when there is no CLI and no network to download it
        raise RuntimeError("Failed starting Temporal dev server: failed to download ephemeral server executable")

    monkeypatch.setattr(coffee.WorkflowEnvironment, "start_local", offline)
    assert coffee.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coffee.py: Failed starting Temporal dev server: failed to download")
    assert err.endswith("; install Temporal's CLI (https://docs.temporal.io/cli), then try again\n")


@slow_first
async def test_a_demo_stopped_by_ctrl_c_takes_its_server_with_it() -> None:
    demo = await spawn("demo", server="127.0.0.1:1")
    await read_until(demo.stdout, "1. A medium latte")
    demo.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        _out, err = await demo.communicate()
    assert demo.returncode == 130 and "Traceback" not in err.decode()
    assert err.decode().splitlines()[-1] == "coffee.py: stopped"
    assert not group_alive(demo.pid), "the demo left its dev server running"
