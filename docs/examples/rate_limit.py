from celery_unique import UniqueTask
from proj.celery import app
from proj.services import call_partner_api


@app.task(base=UniqueTask, global_rate_limit="10/s", rate_limit_key="partner_{account}")
def sync_orders(account, since):
    """At most 10 calls a second to the partner's API per account, across all workers."""
    call_partner_api(account, since)
