import sqlite3

from celery_unique import UniqueTask
from proj.celery import app

DB = "accounts.db"


@app.task(base=UniqueTask, lock="account_{account}", bind=True)
def rebuild(self, account, data):
    """Write ``data`` unless a later holder of the lock has written already."""
    with sqlite3.connect(DB, isolation_level="IMMEDIATE") as db:  # one writer at a time
        db.execute("CREATE TABLE IF NOT EXISTS accounts"
                   " (name TEXT PRIMARY KEY, data TEXT, fence INTEGER)")
        row = db.execute("SELECT fence FROM accounts WHERE name = ?", (account,)).fetchone()
        if row and row[0] > self.request.lock_fence:
            return "stale"           # this job lost its lock; a later holder wrote
        db.execute("INSERT OR REPLACE INTO accounts VALUES (?, ?, ?)",
                   (account, data, self.request.lock_fence))
    return "written"
