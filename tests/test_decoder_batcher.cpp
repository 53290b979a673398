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
