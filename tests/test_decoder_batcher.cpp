// The decoder's batching policy (pi0/decode_batcher.hpp): which waiting frames start as one pass.
#include "catch.hpp"
#include "pi0/check.hpp"
#include "pi0/decode_batcher.hpp"

using pi0::DecodeBatcher;

TEST_CASE("a lone frame starts at once when the decoder is idle", "[decoder][batching]") {
  DecodeBatcher b(2);
  CHECK(b.max_in_flight() == 4);
  b.add();
  CHECK(b.start_next() == 1);  // no waiting for a partner while the GPU idles
  CHECK(b.start_next() == 0);
  CHECK(b.started_frames() == 1);
  CHECK(b.finish_oldest() == 1);
  CHECK(b.started_passes() == 0);
}

TEST_CASE("frames that pile up behind a running pass start together", "[decoder][batching]") {
  DecodeBatcher b(2);
  b.add();
  REQUIRE(b.start_next() == 1);
  b.add();
  CHECK(b.start_next() == 0);  // one waiting frame does not queue behind a running pass
  b.add();
  CHECK(b.start_next() == 2);  // a full pass does
  CHECK(b.started_passes() == 2);
  b.add();
  CHECK(b.start_next() == 0);  // two passes started: the rest waits
  CHECK(b.waiting() == 1);
  CHECK_THROWS_AS(b.add(), pi0::Error);  // four frames in flight at most
  CHECK(b.finish_oldest() == 1);
  CHECK(b.start_next() == 0);  // a pass still runs, and one frame is not a full pass
  b.add();
  CHECK(b.start_next() == 2);
  CHECK(b.finish_oldest() == 2);
  CHECK(b.finish_oldest() == 2);
  CHECK(b.started_frames() == 0);
  CHECK_THROWS_AS(b.finish_oldest(), pi0::Error);
}

TEST_CASE("when the running pass ends, waiting frames start even if too few for a full pass",
          "[decoder][batching]") {
  DecodeBatcher b(3);
  b.add();
  REQUIRE(b.start_next() == 1);
  b.add();
  b.add();
  CHECK(b.start_next() == 0);
  CHECK(b.finish_oldest() == 1);
  CHECK(b.start_next() == 2);  // the decoder would otherwise idle
}

TEST_CASE("batch 1 is plain queueing: one frame runs and one waits behind it",
          "[decoder][batching]") {
  DecodeBatcher b(1);
  CHECK(b.max_in_flight() == 2);
  b.add();
  CHECK(b.start_next() == 1);
  b.add();
  CHECK(b.start_next() == 1);
  CHECK_THROWS_AS(b.add(), pi0::Error);
  CHECK(b.finish_oldest() == 1);
  CHECK(b.finish_oldest() == 1);
}

TEST_CASE("batch sizes outside 1..4 are rejected", "[decoder][batching]") {
  CHECK_THROWS_AS(DecodeBatcher(0), pi0::Error);
  CHECK_THROWS_AS(DecodeBatcher(5), pi0::Error);
}

TEST_CASE("with few slots a pass counts as full at what can wait", "[decoder][batching]") {
  // Batch 2 with only 2 K/V slots: while one frame decodes, at most one can wait, so it queues
  // behind the running pass at once instead of waiting for a partner that cannot come.
  DecodeBatcher b(2, 2, 2);
  b.add();
  REQUIRE(b.start_next() == 1);
  b.add();
  CHECK(b.start_next() == 1);
  // With 3 slots and one frame decoding, two can wait: a pass of one does not queue.
  DecodeBatcher c(2, 2, 3);
  c.add();
  REQUIRE(c.start_next() == 1);
  c.add();
  CHECK(c.start_next() == 0);
  c.add();
  CHECK(c.start_next() == 2);
  CHECK_THROWS_AS(DecodeBatcher(2, 2, 0), pi0::Error);
}
