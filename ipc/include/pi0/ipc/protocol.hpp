// The control messages that flow between orchestrator, encoder worker and decoder worker.
// Fixed-size, versioned, trivially copyable; every message read from shared memory is validated
// before use.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace pi0::ipc {

inline constexpr uint32_t kMessageMagic = 0x5030'4d53;  // "P0MS"
inline constexpr uint16_t kProtocolVersion = 1;

enum class MsgType : uint16_t {
  kWorkerReady = 1,  // worker -> orchestrator: started, weights loaded, WorkerInfo filled in
  kFrameInput = 2,   // orchestrator -> encoder: frame `frame` inputs are in input slot `input_slot`
  kSlotReady = 3,    // encoder -> decoder: kv slot `kv_slot` holds frame `frame`
  kSlotFree = 4,     // decoder -> encoder: kv slot `kv_slot` may be overwritten
  kFrameDone = 5,    // decoder -> orchestrator: frame `frame`'s actions are in output slot `input_slot`
  kError = 6,        // worker -> orchestrator: `text` says what failed; the worker then exits
  kHeartbeat = 7,    // any -> any: alive
  kStop = 8,         // orchestrator -> encoder -> decoder: drain and exit
  kStopped = 9,      // worker -> orchestrator: drained, exiting cleanly
};
inline constexpr uint16_t kMaxMsgType = 9;

struct Message {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint64_t frame;
  uint32_t kv_slot;
  uint32_t input_slot;
  uint64_t submit_ns;   // orchestrator's steady-clock time when the frame was handed in
  uint64_t encode_ns;   // encoder stage time for this frame
  uint64_t decode_ns;   // decoder stage time for this frame
  uint64_t handoff_ns;  // encoder-ready to decoder-start, when measured
  int32_t code;         // error code, or 0
  uint32_t sender;      // Role of the sender
  char text[64];        // NUL-terminated error text (kError): its first 63 bytes (see ErrorText)
};
static_assert(std::is_standard_layout_v<Message> && std::is_trivially_copyable_v<Message>);
static_assert(sizeof(Message) == 128);

enum class Role : uint32_t { kOrchestrator = 0, kEncoder = 1, kDecoder = 2 };
std::string_view role_name(Role r);

// Bounds a receiver checks: slot indices below these counts, frames below max_frame.
struct MessageLimits {
  uint32_t kv_slots;
  uint32_t input_slots;
  uint64_t max_frame;  // exclusive
};

Message make_message(MsgType type, Role sender);
// Copies up to 63 bytes of text, NUL-terminated.
void set_text(Message& m, std::string_view text);
std::string_view message_text(const Message& m);  // bounded by the array, never reads past it

// A worker's whole error text, in its own area of the control segment (ControlHeader). A kError
// message carries only the first 63 bytes, and a worker's error often names a path and the
// system's reason ("weights file '/long/path': cannot open: No such file or directory"), cut
// mid-word there. The whole text goes here instead of into longer ring messages: every message
// of every frame would copy the larger size, for the one error a worker sends as it exits. The
// failing worker writes its area once, before it pushes the kError message; that push (a release)
// publishes it, and the orchestrator reads it once it has popped the message.
inline constexpr size_t kErrorTextBytes = 512;
struct ErrorText {
  char text[kErrorTextBytes];  // NUL-terminated as written; checked as read
};
static_assert(std::is_standard_layout_v<ErrorText> && std::is_trivially_copyable_v<ErrorText>);
static_assert(sizeof(ErrorText) == kErrorTextBytes);
// Copies up to kErrorTextBytes - 1 bytes of text, NUL-filled.
void set_error_text(ErrorText& area, std::string_view text);
// The whole text behind the kError message `m` (validated: its text is NUL-terminated), from its
// sender's area: the area's text where it is NUL-terminated within the area and begins with what
// the message carries; otherwise (an area left unterminated, or not written for this message) the
// message's own text. Reads the area once, into a copy, and never past it.
std::string error_text(const ErrorText& area, const Message& m);

// Empty if the message is well formed for these limits; otherwise a one-line reason
// ("bad magic 0x...", "unknown type 42", "kv slot 7 out of range (2 slots)", ...).
std::string validate(const Message& m, const MessageLimits& limits);

std::string_view type_name(MsgType t);

}  // namespace pi0::ipc
