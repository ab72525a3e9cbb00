"""How a time is shown (sensor_gateway.model.iso): UTC, a Z, milliseconds or the
microseconds the sensor sent, for any datetime, naive (UTC) or aware."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from sensor_gateway.model import iso

OFFSETS = st.one_of(
    st.none(),
    st.just(UTC),
    st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m))),
)


@given(dt=st.datetimes(timezones=OFFSETS))
def test_a_time_is_shown_in_utc_with_its_precision(dt: datetime) -> None:
    utc = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt
    try:
        utc = utc.astimezone(UTC)
    except OverflowError:  # an offset that crosses year 1 or 9999 has no UTC time
        return
    shown = iso(dt)
    assert shown.endswith("Z")
    assert datetime.fromisoformat(shown) == utc
    assert len(shown) == (27 if utc.microsecond % 1000 else 24)
