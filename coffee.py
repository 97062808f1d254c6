# /// script
# requires-python = ">=3.11"
# dependencies = ["temporalio>=1.35.0,<2", "pydantic>=2.14.4,<3"]
# ///
"""Temporal coffee: a coffee shop's orders on Temporal, in one file. Try it: uv run coffee.py demo

Each order is one run of OrderCoffeeWorkflow: price, charge, brew, send the receipt, and refund the charge whenever the
coffee is not made (a saga). Temporal records each step in the order's event history. A worker runs the workflow's code
in turns, called workflow tasks, each ending where the code waits for a step; if the worker dies, another rebuilds the
order by replaying the history through the same code. So workflow code takes the same path every time, with no clock,
randomness or I/O of its own (the SDK's sandbox checks, running this file afresh for each order): whatever touches the
world is an activity, which Temporal retries as its retry policy says.

A service built on it keeps all that comes before the pretend services (the models, the workflow, the activities, the
worker and start_order), and puts clients of real services in their place, keeping the rules that PaymentService
and NotificationService state (each takes the order id as an idempotency key).
"""

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, ClassVar, Literal, Protocol, get_args

if sys.version_info < (3, 11):
    sys.exit("coffee.py needs Python 3.11 or newer: run `uv run coffee.py demo`, which brings its own")
try:
    from pydantic import BaseModel, Field, ValidationError
    from temporalio import activity, exceptions, workflow
    from temporalio.api.common.v1 import WorkflowExecution
    from temporalio.api.workflowservice.v1 import ResetStickyTaskQueueRequest
    from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
    from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.envconfig import ClientConfig
    from temporalio.exceptions import ActivityError, ApplicationError, ApplicationErrorCategory
    from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig
    from temporalio.service import RPCError
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker
except ModuleNotFoundError as missing:
    sys.exit(f"coffee.py needs {missing.name}: run `uv run coffee.py demo`, or `pip install temporalio pydantic`")

TASK_QUEUE = "coffee-orders"

# --- Models: what the client, the workflow and the activities pass to each other ---
Drink = Literal["espresso", "latte", "mocha"]
Size = Literal["S", "M", "L"]
Status = Literal["RECEIVED", "CHARGING", "BREWING", "SENDING_RECEIPT", "REFUNDING", "COMPLETED", "CANCELLED", "FAILED"]


class OrderRequest(BaseModel):
    order_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    drink: Drink
    size: Size


class Payment(BaseModel):  # what the payment provider and the receipt are asked to handle
    order_id: str
    cents: int
    # Which start of the order pays: its workflow's first run id, which Temporal's retries keep, and so does an
    # operator's reset (a rerun from a point in its history); a second start of the same workflow id has its own.
    first_run_id: str


class OrderResult(BaseModel):
    order_id: str
    status: Status = "RECEIVED"
    charged: bool = False
    brewed: bool = False
    receipt_sent: bool = False
    amount_cents: int = 0
    refunded: bool = False
    last_error: str | None = None


class OrderState(OrderResult):  # what the get_status query returns: the result so far
    cancel_requested: bool = False


# --- The workflow: the order's story, which Temporal runs durably ---
RETRY_POLICY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_attempts=5)
STEP = workflow.ActivityConfig(start_to_close_timeout=timedelta(seconds=10), retry_policy=RETRY_POLICY)
BREW = workflow.ActivityConfig(
    start_to_close_timeout=timedelta(minutes=2),
    heartbeat_timeout=timedelta(seconds=3),  # a brew silent this long is taken for dead, and brewed again
    retry_policy=RETRY_POLICY,
    # On a cancel, wait until the brew has really stopped, so that the refund comes after it.
    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
)
# No attempt limit for a refund, which must land: Temporal retries it, backing off to once a minute.
REFUND = STEP | workflow.ActivityConfig(retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=1)))


@workflow.defn
class OrderCoffeeWorkflow:
    """A saga: price, charge, brew, send the receipt; and if the coffee is not made, refund the charge. Both cancels
    lead there: the shop's own signal, cancel_order, and Temporal's own cancel, which run handles as a cancel_order."""

    @workflow.init  # __init__ gets the order too, so that the state exists before a signal or a query comes
    def __init__(self, order: OrderRequest) -> None:
        self._state = OrderState(order_id=order.order_id)
        self._brew: workflow.ActivityHandle[None] | None = None

    @workflow.signal
    def cancel_order(self) -> None:
        """A charge under way finishes (to be refunded), a brew under way stops; once brewed, it is too late."""
        if self._state.status in ("RECEIVED", "CHARGING", "BREWING"):
            self._state.cancel_requested = True
            if self._brew:
                self._brew.cancel()

    @workflow.query
    def get_status(self) -> OrderState:
        return self._state

    @workflow.run  # an input that is no OrderRequest fails the workflow task: the order waits, RUNNING, unpaid
    async def run(self, order: OrderRequest) -> OrderResult:
        if workflow.info().workflow_id != f"order-{order.order_id}":  # one workflow per order id, whoever starts it
            raise ApplicationError(f"order {order.order_id} runs only as workflow order-{order.order_id}")
        # Workflow code runs on the SDK's own deterministic event loop, so asyncio's tasks and shield are allowed.
        serving = asyncio.create_task(self._serve(order))
        try:
            return await asyncio.shield(serving)  # Temporal's cancel interrupts this wait, and not _serve
        except asyncio.CancelledError:  # Temporal's cancel came (only ever once), from its CLI, web UI or API
            self.cancel_order()  # handled as the shop's cancel: the brew stops, then _serve refunds the charge
            result = await serving
            if result.status != "CANCELLED":
                return result  # the cancel came too late: the order had ended, COMPLETED or FAILED
            raise  # the workflow ends Canceled, as Temporal's cancel asks

    async def _serve(self, order: OrderRequest) -> OrderResult:
        state, refund_owed = self._state, False
        try:
            # Priced by a step of its own, whose result the history keeps: a retry or replay on new prices uses it.
            state.amount_cents = await workflow.execute_activity_method(CoffeeActivities.price_order, order, **STEP)
            first_run = workflow.info().first_execution_run_id  # the start of the order that pays
            payment = Payment(order_id=order.order_id, cents=state.amount_cents, first_run_id=first_run)
            if not state.cancel_requested:
                state.status = "CHARGING"
                refund_owed = True  # even if this step fails: an attempt may have taken the money, its reply lost
                await workflow.execute_activity_method(CoffeeActivities.charge_customer, payment, **STEP)
                state.charged = True
            if not state.cancel_requested:
                state.status = "BREWING"
                self._brew = workflow.start_activity_method(CoffeeActivities.brew_coffee, order, **BREW)
                await self._brew  # started, then awaited: a handle to cancel
                state.brewed = True
        except ActivityError as err:  # a step gave up, or a cancel stopped the brew (an ActivityError as well)
            state.last_error = None if state.cancel_requested else str(err.cause)
            if isinstance(err.cause, ApplicationError) and err.cause.type == "PaymentRefused":
                refund_owed = False  # the order id was paid for or refunded before: no money moved, nothing to undo
        if state.brewed:
            state.status = "SENDING_RECEIPT"
            try:
                await workflow.execute_activity_method(CoffeeActivities.send_receipt, payment, **STEP)
                state.receipt_sent = True
            except ActivityError as err:  # a lost receipt does not undo a coffee made and paid for
                state.last_error = str(err.cause)
            return self._end("COMPLETED")
        if refund_owed:  # the saga's compensation
            state.status = "REFUNDING"
            refunded = await workflow.execute_activity_method(CoffeeActivities.refund_customer, payment, **REFUND)
            state.refunded = refunded > 0  # 0 cents if no charge had landed; the provider then refuses any later one
        return self._end("CANCELLED" if state.cancel_requested else "FAILED")

    def _end(self, status: Status) -> OrderResult:
        self._state.status = status
        return OrderResult(**self._state.model_dump(exclude={"cancel_requested"}))


# --- Activities: the steps that touch the world. The plain def ones run on the worker's threads, where a slow call
# (a payment API, SMTP) cannot block the event loop, which the async brew needs for its heartbeats ---
class CoffeeActivities:
    def __init__(self, services: "ServiceFactory") -> None:
        self.services = services

    @activity.defn
    def price_order(self, order: OrderRequest) -> int:
        return self.services.pricing.price_cents(order.drink, order.size)

    @activity.defn
    def charge_customer(self, payment: Payment) -> None:
        try:  # The order id is the idempotency key: an attempt made again charges nothing new.
            self.services.payment.charge(payment)
        except PaymentRefused as err:  # final: non_retryable fails the step at once; BENIGN: the provider logged it
            category = ApplicationErrorCategory.BENIGN
            raise ApplicationError(str(err), type="PaymentRefused", non_retryable=True, category=category) from None

    @activity.defn
    async def brew_coffee(self, order: OrderRequest) -> None:
        # Heartbeats tell Temporal the brew is alive, and their replies bring a cancel, as asyncio.CancelledError.
        try:
            await self.services.brewing.brew(order, heartbeat=activity.heartbeat)
        except BrewMachineJammed as err:  # expected (BENIGN: logged with no traceback), and retried by the retry policy
            raise ApplicationError(
                str(err), type="BrewMachineJammed", category=ApplicationErrorCategory.BENIGN
            ) from None

    @activity.defn
    def send_receipt(self, payment: Payment) -> None:
        self.services.notification.send_receipt(payment)

    @activity.defn
    def refund_customer(self, payment: Payment) -> int:
        return self.services.payment.refund(payment)


# --- The worker, which polls the task queue and runs workflow tasks and activities; and placing an order ---
ACTIVITY_SLOTS = 20  # activities a worker runs at once


def new_worker(client: Client, services: "ServiceFactory") -> Worker:
    shop = CoffeeActivities(services)
    return Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[OrderCoffeeWorkflow],
        activities=[shop.price_order, shop.charge_customer, shop.brew_coffee, shop.send_receipt, shop.refund_customer],
        # As many threads, for the plain def activities, as activities taken at once: an attempt's timeout runs from
        # when the worker takes it, so an attempt left waiting for a thread would time out, and run late all the same.
        activity_executor=ThreadPoolExecutor(ACTIVITY_SLOTS),
        max_concurrent_activities=ACTIVITY_SLOTS,
    )


Handle = WorkflowHandle[OrderCoffeeWorkflow, OrderResult]


class CommandError(Exception):
    """A problem the user can fix: coffee.py says it in one line, and exits 1."""


async def start_order(client: Client, order: OrderRequest) -> Handle:
    """Place the order; or, if its id was placed before, find that order: one id, one order, one charge."""
    workflow_id = f"order-{order.order_id}"
    try:  # REJECT_DUPLICATE: even once that order has finished
        policy = WorkflowIDReusePolicy.REJECT_DUPLICATE
        return await client.start_workflow(
            OrderCoffeeWorkflow.run, order, id=workflow_id, task_queue=TASK_QUEUE, id_reuse_policy=policy
        )
    except exceptions.WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle_for(OrderCoffeeWorkflow.run, workflow_id)
        started = (await handle.fetch_history()).events[0].workflow_execution_started_event_attributes
        with contextlib.suppress(Exception):  # what was ordered, from the server's own record: that order's input
            if await client.data_converter.decode(started.input.payloads, [OrderRequest]) == [order]:
                print(f"Order {order.order_id} was placed before: this is it; nothing new is charged.", file=sys.stderr)
                return handle
        raise CommandError(f"order {order.order_id} was placed before, for another drink or size") from None


# --- Services: pretend ones, for pricing, payment, brewing and receipts, knowing nothing of Temporal ---
class PricingStrategy(Protocol):
    def price_cents(self, drink: Drink, size: Size) -> int: ...


class StandardPricingStrategy:  # a base price by size plus a surcharge by drink: a medium latte is 450 + 75 cents
    BASE_CENTS: ClassVar[dict[Size, int]] = {"S": 350, "M": 450, "L": 550}
    SURCHARGE_CENTS: ClassVar[dict[Drink, int]] = {"espresso": 0, "latte": 75, "mocha": 100}

    def price_cents(self, drink: Drink, size: Size) -> int:
        return self.BASE_CENTS[size] + self.SURCHARGE_CENTS[drink]


class Records:
    """A pretend service's records: a SQLite file that workers share and that outlives them. This process's threads
    take turns with its one connection, and workers in other processes may read it while one writes (WAL)."""

    def __init__(self, database: str, table: str) -> None:
        try:
            self._db = sqlite3.connect(database, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute(f"CREATE TABLE IF NOT EXISTS {table}")
        except sqlite3.Error as err:
            raise CommandError(f"cannot keep records in {database}: {err}") from None
        self._turn = threading.Lock()

    def run(self, sql: str, values: Any = ()) -> tuple[int, Any]:  # the rows it changed, and the first row it read
        with self._turn:
            cursor = self._db.execute(sql, values)
            return cursor.rowcount, cursor.fetchone()


class PaymentRefused(Exception): ...


class PaymentService:
    """A pretend payment provider. Like a real one, it takes an idempotency key (the order id) and keeps one payment
    per key, with the start of the order that made it. A key is charged, then maybe refunded; a refund that finds no
    charge voids the key, so that a charge slow to land cannot land after it. A call made again changes nothing; a
    charge of another amount, under a void or refunded key, or from another start of the order id, is refused."""

    def __init__(self, database: str) -> None:
        self._db = Records(database, "payments (order_id PRIMARY KEY, cents, state, first_run_id)")
        self._log = logging.getLogger("coffee.payment")

    def charge(self, payment: Payment) -> None:
        self._log.info("Charging order %s for %d cents", payment.order_id, payment.cents)
        sql = "INSERT OR IGNORE INTO payments VALUES (:order_id, :cents, 'charged', :first_run_id)"
        new, _ = self._db.run(sql, payment.model_dump())
        if (found := self.payment(payment.order_id)) != ("charged", payment.cents, payment.first_run_id):
            self._log.warning("Refused to charge order %s: its payment is %s, %d cents", payment.order_id, *found[:2])
            raise PaymentRefused(f"order {payment.order_id} has a payment ({found[0]}, {found[1]} cents): use a new id")
        self._log.info("Charge successful for order %s" if new else "Order %s was charged before", payment.order_id)

    def refund(self, payment: Payment) -> int:
        keys = payment.model_dump()
        self._db.run("INSERT OR IGNORE INTO payments VALUES (:order_id, 0, 'void', :first_run_id)", keys)
        sql = "UPDATE payments SET state = 'refunded' WHERE state = 'charged' AND order_id = :order_id"
        sql += " AND first_run_id = :first_run_id"  # only this start's own charge
        if self._db.run(sql, keys)[0]:
            self._log.info("Refunded %d cents for order %s", payment.cents, payment.order_id)
        state, cents, paid_by = self.payment(payment.order_id)
        return cents if (state, paid_by) == ("refunded", payment.first_run_id) else 0

    def payment(self, order_id: str) -> tuple[str, int, str]:  # "charged", "refunded", "void" or "none"; cents; by
        sql = "SELECT state, cents, first_run_id FROM payments WHERE order_id = ?"
        return self._db.run(sql, (order_id,))[1] or ("none", 0, "")


class BrewMachineJammed(Exception): ...


class BrewService:  # a pretend espresso machine that takes its time, and jams now and then
    def __init__(self, failure_rate: float, seconds: float) -> None:
        self.failure_rate, self.seconds = failure_rate, seconds
        self._log = logging.getLogger("coffee.brewing")

    async def brew(self, order: OrderRequest, heartbeat: Callable[[], None]) -> None:
        self._log.info("Brewing %s (%s) for order %s", order.drink, order.size, order.order_id)
        jams = self.jams(order)
        seconds = self.seconds / 2 if jams else self.seconds  # a jam strikes halfway
        try:
            for _ in range(round(seconds * 2)):  # a heartbeat each half second
                heartbeat()
                await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            self._log.info("Brew stopped for order %s", order.order_id)
            raise
        if jams:
            self._log.error("Brew machine jammed for order %s!", order.order_id)
            raise BrewMachineJammed(f"Brew machine jammed for order {order.order_id}!")
        self._log.info("Brew complete for order %s", order.order_id)

    def jams(self, order: OrderRequest) -> bool:
        return random.random() < self.failure_rate


class NotificationService:  # a pretend mail service; like the provider, it sends one receipt per order id
    def __init__(self, database: str) -> None:
        self._db = Records(database, "receipts (order_id PRIMARY KEY, cents)")
        self._log = logging.getLogger("coffee.notify")

    def send_receipt(self, payment: Payment) -> None:
        self._log.info("Sending receipt for order %s", payment.order_id)
        sent, _ = self._db.run("INSERT OR IGNORE INTO receipts VALUES (?, ?)", (payment.order_id, payment.cents))
        self._log.info(
            "Receipt sent for order %s" if sent else "Receipt for order %s was sent before", payment.order_id
        )


class ServiceFactory:  # builds each service once, for a worker's activities
    def __init__(self, brew_failure_rate: float = 0.3, brew_seconds: float = 2.5, records: str | None = None):
        records = records or os.path.join(tempfile.gettempdir(), "coffee-records.sqlite3")
        self.pricing: PricingStrategy = StandardPricingStrategy()
        self.payment = PaymentService(records)
        self.brewing = BrewService(brew_failure_rate, brew_seconds)
        self.notification = NotificationService(records)


# --- The client: connect, wait for an order's result ---
async def connect() -> Client:  # to the server that Temporal's environment configuration names (see parse_args)
    try:
        config = ClientConfig.load_client_connect_config()
    except RuntimeError as err:  # its message goes on to quote the file, secrets and all: only its first line
        file = os.environ.get("TEMPORAL_CONFIG_FILE", "Temporal's config file")
        raise CommandError(f"cannot read {file}: {str(err).splitlines()[0]}") from None
    address = config.setdefault("target_host", "localhost:7233")
    try:
        return await Client.connect(**config, data_converter=pydantic_data_converter)
    except RuntimeError as err:
        hint = "start one with `temporal server start-dev`, or run coffee.py's demo, which needs none"
        raise CommandError(f"no Temporal server answered at {address} ({err}); {hint}") from None


async def wait_for_order(
    handle: Handle, on_state: Callable[[OrderState], None] | None, cancel_after: float | None
) -> OrderResult:
    """The order's result; on the way, report each new state (get_status), or send cancel_order, if asked."""

    async def watch(on_state: Callable[[OrderState], None]) -> None:
        last = None
        while True:
            with contextlib.suppress(RPCError):  # a query needs a worker to answer it: ask again
                if (state := await handle.query(OrderCoffeeWorkflow.get_status)) != last:
                    on_state(last := state)
            await asyncio.sleep(0.2)

    async def cancel_later(seconds: float) -> None:
        await asyncio.sleep(seconds)
        await handle.signal(OrderCoffeeWorkflow.cancel_order)

    helpers = [asyncio.create_task(watch(on_state))] if on_state else []
    helpers += [asyncio.create_task(cancel_later(cancel_after))] if cancel_after is not None else []
    try:
        return await handle.result()
    finally:
        for task in helpers:
            task.cancel()


# --- The demo: a dev server, workers and four orders, in one command ---
async def run_demo(args: argparse.Namespace) -> None:
    tag = os.urandom(2).hex()  # fresh order ids on every run
    latte = OrderRequest(order_id=f"latte-{tag}", drink="latte", size="M")
    mocha = OrderRequest(order_id=f"mocha-{tag}", drink="mocha", size="L")
    espresso = OrderRequest(order_id=f"espresso-{tag}", drink="espresso", size="S")
    crash = OrderRequest(order_id=f"crash-{tag}", drink="latte", size="M")

    class FirstLatteJams(BrewService):  # the demo's machine: only the latte's first brew jams
        def jams(self, order: OrderRequest) -> bool:
            return order == latte and activity.info().attempt == 1

    services = ServiceFactory()
    services.brewing = FirstLatteJams(failure_rate=0, seconds=4)
    with socket.socket() as free:  # a free port, for the web UI
        free.bind(("localhost", 0))
        ui_port = free.getsockname()[1]
    cli = shutil.which("temporal") or shutil.which("temporal", path=os.path.dirname(sys.executable))
    try:  # on Temporal's CLI if it is installed; if not, the SDK downloads it
        server = await WorkflowEnvironment.start_local(
            ui=True,
            ui_port=ui_port,
            dev_server_existing_path=cli,
            data_converter=pydantic_data_converter,
            dev_server_log_level="error",
            dev_server_extra_args=["--output", "none"],
        )
    except RuntimeError as err:
        raise CommandError(f"{err}; install Temporal's CLI (https://docs.temporal.io/cli), then try again") from None
    async with server:
        client, ui = server.client, f"http://localhost:{ui_port}/namespaces/default/workflows"
        print(f"Temporal coffee: four orders on the demo's own dev server. Its web UI, while the demo runs: {ui}")
        print("Each order is a run of OrderCoffeeWorkflow: charge, brew, send a receipt. This process is the worker.")

        async def place(order: OrderRequest, story: str) -> Handle:
            print(f"\n{story}\n   {ui}/order-{order.order_id}")
            return await start_order(client, order)

        def report(order: OrderRequest, result: OrderResult) -> None:
            state, cents, _ = services.payment.payment(order.order_id)
            print(f"   result: {result.model_dump_json()}\n   the payment provider's record: {state}, {cents} cents")

        async with new_worker(client, services):
            report(latte, await (await place(latte, "1. A medium latte, whose first brew jams.")).result())
            print("   Temporal ran brew_coffee again 1 s after the jam (its retry policy); one charge: 450 + 75 cents.")
            handle = await place(mocha, "2. A large mocha, watched by the get_status query, which changes nothing.")
            report(mocha, await wait_for_order(handle, lambda state: print(f"   get_status: {state.status}"), None))
            handle = await place(espresso, "3. A small espresso, cancelled 1 s in by the cancel_order signal.")
            report(espresso, await wait_for_order(handle, None, cancel_after=1))
            print("   The brew heard of the cancel in a heartbeat's reply, and stopped; then came the refund.")
        handle = await place(crash, "4. A medium latte, whose worker (another process: coffee.py worker) is killed.")
        env = {**os.environ, "TEMPORAL_ADDRESS": client.service_client.config.target_host}
        command = [sys.executable, __file__, "worker", "--brew-failure-rate", "0", "--brew-seconds", "4"]
        worker = await asyncio.create_subprocess_exec(*command, env=env, stderr=asyncio.subprocess.PIPE)
        try:
            async for line in worker.stderr:  # type: ignore[union-attr]  # its log, passed on until it is brewing
                print(line.decode(), end="", file=sys.stderr)
                if b"Brewing" in line:
                    break
            await asyncio.sleep(1)
        finally:
            worker.kill()  # as kill -9 does: the worker hands nothing back
            await worker.wait()
        print("   Killed it, 1 s into the brew. This process becomes the next worker; it has never seen this order.")
        # The server sends an order's workflow tasks to the worker that ran its last one (its "sticky" queue), and
        # waits 10 s for it before it gives them to any worker: tell it that this one is gone.
        gone = ResetStickyTaskQueueRequest(namespace="default", execution=WorkflowExecution(workflow_id=handle.id))
        await client.workflow_service.reset_sticky_task_queue(gone)
        async with new_worker(client, services):
            report(crash, await handle.result())
        print("   At the brew's heartbeat timeout, Temporal ran it again, here. This worker rebuilt the order by")
        print("   replaying its history, which held the charge: no second charge. In the history:")
        async for event in handle.fetch_history_events():  # an ActivityTaskStarted event of a second attempt
            if (started := event.activity_task_started_event_attributes).attempt > 1:  # (on other events: empty)
                print(f"   brew_coffee's attempt {started.attempt} started, after: {started.last_failure.message}")
    coffee = "uv run coffee.py" if "UV" in os.environ else f"{sys.executable} {sys.argv[0]}"  # as it was run
    print("\nThe demo's server has stopped, and its links with it. To run the parts yourself, each in a terminal:")
    if os.path.dirname(__file__) == tempfile.gettempdir():  # uv ran it from a URL, from a copy that is gone now
        print("  (first save the script here as coffee.py: curl -Lo coffee.py <its URL>)")
    print(f"  {cli or 'temporal'} server start-dev --db-filename coffee.db  (https://docs.temporal.io/cli)")
    print(f"  {coffee} worker\n  {coffee} order --order-id {tag} --drink latte --size M --query")


# --- The command line ---
async def run_worker(args: argparse.Namespace) -> None:
    services = ServiceFactory(args.brew_failure_rate, args.brew_seconds, args.records)
    async with new_worker(await connect(), services):
        logging.getLogger("coffee.worker").info("Worker %d polling task queue %r", os.getpid(), TASK_QUEUE)
        await asyncio.Event().wait()  # until Ctrl-C


def seconds(text: str) -> float:
    if not float(text) >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or more")
    return float(text)


def share(text: str) -> float:
    if not 0 <= float(text) <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not from 0 to 1")
    return float(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    server = "Server: TEMPORAL_ADDRESS (else localhost:7233), TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_PROFILE"
    parser = argparse.ArgumentParser(prog="coffee.py", description="Coffee orders on Temporal.", epilog=server)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = "Starts a Temporal dev server of its own and places four orders: a jam, a query, a cancel, a killed worker."
    commands.add_parser("demo", help="a dev server, workers and four orders, in one command", description=demo)
    worker = commands.add_parser("worker", help=f"serve orders from task queue {TASK_QUEUE!r}")
    worker.add_argument("--brew-failure-rate", type=share, default=0.3, help="the share of brews that jam")
    worker.add_argument("--brew-seconds", type=seconds, default=2.5, help="how long a brew takes")
    worker.add_argument("--records", help="the pretend payment and mail services' file (default: in the temp folder)")
    order = commands.add_parser("order", help="place an order as workflow order-<ID>, and print its result")
    order.add_argument("--order-id", required=True, metavar="ID", help="1 to 64 letters, digits, - or _")
    order.add_argument("--drink", required=True, choices=get_args(Drink))
    order.add_argument("--size", required=True, choices=get_args(Size))
    order.add_argument("--query", action="store_true", help="print its state (get_status) each time it changes")
    order.add_argument("--cancel-after", type=seconds, metavar="SECONDS", help="send cancel_order after this long")
    return parser.parse_args(argv)


async def place_order(args: argparse.Namespace) -> int:
    order = OrderRequest(order_id=args.order_id, drink=args.drink, size=args.size)
    show = f"`temporal workflow show -w order-{order.order_id}`"
    on_state = (lambda state: print(state.model_dump_json())) if args.query else None
    try:
        result = await wait_for_order(await start_order(await connect(), order), on_state, args.cancel_after)
    except WorkflowFailureError as err:
        if isinstance(err.cause, exceptions.CancelledError):  # Temporal's, not asyncio's
            print(f"Order {order.order_id} was cancelled through Temporal; any charge was refunded. See {show}.")
            return 0
        raise CommandError(f"order {order.order_id} did not finish: {err.cause}. See {show}.") from None
    print(result.model_dump_json(indent=2))
    if result.status == "FAILED":
        print(f"Order {order.order_id} failed: {result.last_error}", file=sys.stderr)
    return 1 if result.status == "FAILED" else 0


def one_line(record: logging.LogRecord) -> bool:  # an attempt the server dropped (in a restart, say): no traceback
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        record.exc_info = None
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_line = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_line, datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("temporalio").setLevel(logging.WARNING if args.command == "worker" else logging.ERROR)
    logging.getLogger("temporalio.activity").addFilter(one_line)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # in step with the log, when piped

    try:  # Ctrl-C cancels the command, so that each `async with` cleans up
        return asyncio.run({"demo": run_demo, "worker": run_worker, "order": place_order}[args.command](args)) or 0
    except CommandError as err:
        print(f"coffee.py: {err}", file=sys.stderr)
    except RPCError as err:  # the server refused a call, or could not be reached for a while
        print(f"coffee.py: a call to the Temporal server failed: {err}", file=sys.stderr)
    except ValidationError as err:  # a bad --order-id
        print(f"coffee.py: invalid {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}", file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM
        going_on = f"; order {args.order_id} goes on" if args.command == "order" else ""
        print(f"coffee.py: stopped{going_on}", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C works even where a shell ignored it (cmd &)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))  # SIGTERM stops it as Ctrl-C does
    # The SDK's core logs through Python's logging, to stderr: else its warnings would land on stdout, in order's JSON.
    core_logs = LoggingConfig(LoggingConfig.default.filter, LogForwardingConfig(logging.getLogger("temporalio.core")))
    Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=core_logs)))
    os._exit(main())  # no Python teardown, which temporalio's threads can crash (sdk-python issue 300)
