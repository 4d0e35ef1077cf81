"""A child process for the crash tests of a user's sessions: it ends (or logs in and ends) sessions of a
user in a BuntStore and is SIGKILLed by the test at a chosen or random moment.

    python child_users.py PATH pause:N        end alice's sessions; stop for good after the N-th delete
    python child_users.py PATH pause:unbind   end alice's sessions; stop inside the index update
    python child_users.py PATH churn          log alice in and end her sessions, forever ("ACK n" each round)
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio

from buntsession import DB, BuntStore
from buntsession.lifecycle import Lifecycle


async def log_in(life: Lifecycle, user: str) -> None:
    session = await life.load(None)
    session.put_string("cart", "apple")
    session.login(user)
    await life.commit(session, ok=True, request_headers=[(b"user-agent", b"child")])


async def main(path: str, mode: str) -> None:
    async with DB(path, sync="always") as db:
        store = BuntStore(db)
        if mode.startswith("pause:"):
            stop = mode.split(":", 1)[1]
            deletes = 0
            delete, update = db.delete, db.update

            async def pausing_delete(key: str) -> bool:
                nonlocal deletes
                done = await delete(key)
                deletes += 1
                if stop != "unbind" and deletes == int(stop):
                    print(f"PAUSED {deletes}", flush=True)
                    time.sleep(600)
                return done

            async def pausing_update(key: str, change: Any) -> bool:
                if stop == "unbind" and key.startswith("session:user:"):
                    print(f"PAUSED {deletes}", flush=True)
                    time.sleep(600)
                return await update(key, change)

            db.delete = pausing_delete  # type: ignore[method-assign]
            db.update = pausing_update  # type: ignore[method-assign]
            print("ENDING", flush=True)
            await store.end_user_sessions("alice")
            print("ENDED", flush=True)  # and exit: a test waiting for PAUSED then fails instead of hanging
        elif mode == "churn":
            life = Lifecycle(store, 3600)
            n = 0
            while True:
                for _ in range(3):
                    await log_in(life, "alice")
                await store.end_user_sessions("alice")
                print(f"ACK {n}", flush=True)
                n += 1


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
