#include <chrono>
#include <cstring>
#include <limits>
#include <string>

#include "catch.hpp"
#include "pi0/ipc/protocol.hpp"
#include "pi0/ipc/worker_runtime.hpp"

using namespace pi0::ipc;

namespace {

constexpr MessageLimits kLimits{2, 4, 1000};

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("make_message fills the header and zeroes the rest", "[ipc]") {
  const Message m = make_message(MsgType::kSlotReady, Role::kEncoder);
  CHECK(m.magic == kMessageMagic);
  CHECK(m.version == kProtocolVersion);
  CHECK(m.type == static_cast<uint16_t>(MsgType::kSlotReady));
  CHECK(m.sender == static_cast<uint32_t>(Role::kEncoder));
  CHECK(m.frame == 0);
  CHECK(m.kv_slot == 0);
  CHECK(m.input_slot == 0);
  CHECK(m.submit_ns == 0);
  CHECK(m.code == 0);
  for (char c : m.text) CHECK(c == '\0');
  CHECK(validate(m, kLimits).empty());
}

TEST_CASE("set_text truncates and terminates and message_text stays in bounds", "[ipc]") {
  Message m = make_message(MsgType::kError, Role::kDecoder);
  set_text(m, "cuda out of memory");
  CHECK(message_text(m) == "cuda out of memory");
  CHECK(validate(m, kLimits).empty());

  const std::string long_text(200, 'x');
  set_text(m, long_text);
  CHECK(message_text(m) == std::string(63, 'x'));
  CHECK(m.text[63] == '\0');

  set_text(m, "short");
  CHECK(message_text(m) == "short");
  CHECK(m.text[6] == '\0');  // the tail of the previous longer text is cleared

  std::memset(m.text, 'y', sizeof(m.text));
  CHECK(message_text(m).size() == sizeof(m.text));
}

// A worker's error goes whole into its area of the control segment, its first 63 bytes into the
// kError message; the orchestrator takes the area's text only where it is terminated and agrees
// with the message.
TEST_CASE("error_text gives the whole text from a worker's area and checks it", "[ipc]") {
  Message m = make_message(MsgType::kError, Role::kEncoder);
  ErrorText area;
  std::memset(&area, 0, sizeof(area));
  const std::string whole =
      "weights file '/a/path/long/enough/to/pass/63/bytes/tiny.safetensors': cannot open: No such "
      "file or directory";
  REQUIRE(whole.size() > sizeof(m.text));
  set_text(m, whole);
  set_error_text(area, whole);
  CHECK(error_text(area, m) == whole);

  SECTION("a text longer than the area is cut there") {
    const std::string huge(2 * kErrorTextBytes, 'y');
    set_text(m, huge);
    set_error_text(area, huge);
    CHECK(error_text(area, m) == std::string(kErrorTextBytes - 1, 'y'));
    set_error_text(area, "short");  // the tail of the longer text is cleared
    CHECK(area.text[5] == '\0');
    CHECK(area.text[kErrorTextBytes - 2] == '\0');
  }
  SECTION("an area that is not NUL-terminated gives the message's text") {
    std::memset(area.text, 'z', sizeof(area.text));
    CHECK(error_text(area, m) == message_text(m));
  }
  SECTION("an area that does not begin with the message's text gives the message's text") {
    set_error_text(area, "an older error, not this message's");
    CHECK(error_text(area, m) == message_text(m));
  }
  SECTION("an area never written gives the message's text") {
    std::memset(&area, 0, sizeof(area));
    CHECK(error_text(area, m) == message_text(m));
  }
}

TEST_CASE("type and role names", "[ipc]") {
  CHECK(type_name(MsgType::kFrameInput) == "FrameInput");
  CHECK(type_name(MsgType::kStopped) == "Stopped");
  CHECK(type_name(static_cast<MsgType>(77)) == "Unknown");
  CHECK(role_name(Role::kOrchestrator) == "orchestrator");
  CHECK(role_name(Role::kEncoder) == "encoder");
  CHECK(role_name(Role::kDecoder) == "decoder");
  CHECK(role_name(static_cast<Role>(9)) == "unknown-role");
}

TEST_CASE("validate accepts every well formed type", "[ipc]") {
  for (uint16_t t = 1; t <= kMaxMsgType; ++t) {
    Message m = make_message(static_cast<MsgType>(t), Role::kOrchestrator);
    m.frame = 999;
    m.kv_slot = 1;
    m.input_slot = 3;
    INFO("type " << t);
    CHECK(validate(m, kLimits).empty());
  }
}

TEST_CASE("validate rejects corrupted messages", "[ipc]") {
  Message m = make_message(MsgType::kSlotReady, Role::kEncoder);
  m.frame = 5;
  m.kv_slot = 1;
  m.input_slot = 2;
  REQUIRE(validate(m, kLimits).empty());

  SECTION("bad magic") {
    m.magic = 0xdeadbeef;
    const std::string why = validate(m, kLimits);
    CHECK(contains(why, "bad magic"));
    CHECK(contains(why, "0xdeadbeef"));
  }
  SECTION("bad version") {
    m.version = 2;
    CHECK(contains(validate(m, kLimits), "version 2"));
  }
  SECTION("unknown type zero") {
    m.type = 0;
    CHECK(contains(validate(m, kLimits), "unknown type 0"));
  }
  SECTION("unknown type past the last") {
    m.type = kMaxMsgType + 1;
    CHECK(contains(validate(m, kLimits), "unknown type"));
  }
  SECTION("kv slot out of range") {
    m.kv_slot = 2;
    const std::string why = validate(m, kLimits);
    CHECK(contains(why, "kv slot 2 out of range"));
    CHECK(contains(why, "2 slots"));
  }
  SECTION("kv slot out of range in SlotFree") {
    Message f = make_message(MsgType::kSlotFree, Role::kDecoder);
    f.kv_slot = 7;
    CHECK(contains(validate(f, kLimits), "kv slot 7"));
  }
  SECTION("input slot out of range") {
    m.input_slot = 4;
    CHECK(contains(validate(m, kLimits), "input slot 4 out of range"));
  }
  SECTION("input slot out of range in FrameInput and FrameDone") {
    for (MsgType t : {MsgType::kFrameInput, MsgType::kFrameDone}) {
      Message f = make_message(t, Role::kOrchestrator);
      f.input_slot = 100;
      CHECK(contains(validate(f, kLimits), "input slot 100"));
    }
  }
  SECTION("frame out of range") {
    m.frame = 1000;
    CHECK(contains(validate(m, kLimits), "frame 1000 out of range"));
  }
  SECTION("unknown sender") {
    m.sender = 3;
    CHECK(contains(validate(m, kLimits), "sender"));
  }
  SECTION("unterminated error text") {
    Message e = make_message(MsgType::kError, Role::kDecoder);
    std::memset(e.text, 'z', sizeof(e.text));
    CHECK(contains(validate(e, kLimits), "NUL"));
  }
  SECTION("fields a type does not carry are not checked") {
    Message h = make_message(MsgType::kHeartbeat, Role::kDecoder);
    h.kv_slot = 99;
    h.input_slot = 99;
    h.frame = ~0ULL;
    std::memset(h.text, 'z', sizeof(h.text));
    CHECK(validate(h, kLimits).empty());
  }
  SECTION("reasons are one line") {
    m.magic = 1;
    const std::string why = validate(m, kLimits);
    INFO(why);
    CHECK_FALSE(why.empty());  // a reason at all: an empty one has no line break either
    CHECK(why.find('\n') == std::string::npos);
  }
}

// Worker deadlines come from seconds given on a command line: a value the clock cannot hold (NaN
// included) must not reach the float-to-integer cast, which would be undefined behaviour.
TEST_CASE("worker deadlines from seconds hold any value", "[ipc]") {
  using pi0::ipc::Clock;
  using pi0::ipc::Deadline;
  using pi0::ipc::WorkerRuntime;
  CHECK(WorkerRuntime::after(std::numeric_limits<double>::quiet_NaN()) == Deadline::max());
  CHECK(WorkerRuntime::after(std::numeric_limits<double>::infinity()) == Deadline::max());
  CHECK(WorkerRuntime::after(1e300) == Deadline::max());
  const auto before = Clock::now();
  const Deadline past = WorkerRuntime::after(-5.0);
  CHECK(past >= before);
  CHECK(past <= Clock::now());
  const Deadline soon = WorkerRuntime::after(2.0);
  CHECK(soon - before >= std::chrono::milliseconds(1999));
  CHECK(soon - before < std::chrono::seconds(60));
}
