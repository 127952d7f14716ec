def use_tls(app):
    app.conf.unique_redis_url = "rediss://redis.internal:6380/0"
    app.conf.unique_redis_options = {"ssl_ca_certs": "/etc/ssl/redis-ca.pem"}


def use_sentinel(app):
    app.conf.unique_redis_url = "sentinel://s1:26379;sentinel://s2:26379/0"
    app.conf.unique_redis_options = {"master_name": "mymaster",
                                     "sentinel_kwargs": {"password": "..."}}


def use_a_client_of_your_own(app):
    import redis

    app.conf.unique_redis_client = lambda app: redis.Redis(host="redis.internal",
                                                           health_check_interval=30)
