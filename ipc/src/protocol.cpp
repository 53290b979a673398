#include "pi0/ipc/protocol.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace pi0::ipc {
namespace {

// Which fields a message type carries, so validate() bounds-checks exactly those and a receiver
// may index with them without checking again.
bool carries_kv_slot(uint16_t type) {
  return type == static_cast<uint16_t>(MsgType::kSlotReady) ||
         type == static_cast<uint16_t>(MsgType::kSlotFree);
}
bool carries_input_slot(uint16_t type) {
  return type == static_cast<uint16_t>(MsgType::kFrameInput) ||
         type == static_cast<uint16_t>(MsgType::kSlotReady) ||
         type == static_cast<uint16_t>(MsgType::kFrameDone);
}
bool carries_frame(uint16_t type) { return carries_input_slot(type); }

std::string format(const char* fmt, auto... args) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), fmt, args...);
  return buf;
}

}  // namespace

std::string_view role_name(Role r) {
  switch (r) {
    case Role::kOrchestrator: return "orchestrator";
    case Role::kEncoder: return "encoder";
    case Role::kDecoder: return "decoder";
  }
  return "unknown-role";
}

std::string_view type_name(MsgType t) {
  switch (t) {
    case MsgType::kWorkerReady: return "WorkerReady";
    case MsgType::kFrameInput: return "FrameInput";
    case MsgType::kSlotReady: return "SlotReady";
    case MsgType::kSlotFree: return "SlotFree";
    case MsgType::kFrameDone: return "FrameDone";
    case MsgType::kError: return "Error";
    case MsgType::kHeartbeat: return "Heartbeat";
    case MsgType::kStop: return "Stop";
    case MsgType::kStopped: return "Stopped";
  }
  return "Unknown";
}

Message make_message(MsgType type, Role sender) {
  Message m;
  std::memset(&m, 0, sizeof(m));  // padding-free, but zero every byte so shm never leaks stack data
  m.magic = kMessageMagic;
  m.version = kProtocolVersion;
  m.type = static_cast<uint16_t>(type);
  m.sender = static_cast<uint32_t>(sender);
  return m;
}

void set_text(Message& m, std::string_view text) {
  const size_t n = std::min(text.size(), sizeof(m.text) - 1);
  std::memcpy(m.text, text.data(), n);
  std::memset(m.text + n, 0, sizeof(m.text) - n);
}

std::string_view message_text(const Message& m) {
  // A peer may hand us an unterminated array; memchr keeps the read inside it.
  const void* nul = std::memchr(m.text, '\0', sizeof(m.text));
  const size_t n = nul ? static_cast<size_t>(static_cast<const char*>(nul) - m.text) : sizeof(m.text);
  return {m.text, n};
}

void set_error_text(ErrorText& area, std::string_view text) {
  const size_t n = std::min(text.size(), sizeof(area.text) - 1);
  std::memcpy(area.text, text.data(), n);
  std::memset(area.text + n, 0, sizeof(area.text) - n);
}

std::string error_text(const ErrorText& area, const Message& m) {
  // One copy, checked: the worker that writes the area could still be changing it.
  ErrorText copy;
  std::memcpy(&copy, &area, sizeof(copy));
  const std::string_view carried = message_text(m);
  const void* nul = std::memchr(copy.text, '\0', sizeof(copy.text));
  if (nul == nullptr) return std::string(carried);
  const std::string_view whole(copy.text, static_cast<const char*>(nul) - copy.text);
  return std::string(whole.starts_with(carried) ? whole : carried);
}

std::string validate(const Message& m, const MessageLimits& limits) {
  if (m.magic != kMessageMagic)
    return format("bad magic 0x%08x (expected 0x%08x)", static_cast<unsigned>(m.magic),
                  static_cast<unsigned>(kMessageMagic));
  if (m.version != kProtocolVersion)
    return format("unsupported protocol version %u (expected %u)", static_cast<unsigned>(m.version),
                  static_cast<unsigned>(kProtocolVersion));
  if (m.type == 0 || m.type > kMaxMsgType)
    return format("unknown type %u", static_cast<unsigned>(m.type));
  const auto type_str = type_name(static_cast<MsgType>(m.type));
  if (m.sender > static_cast<uint32_t>(Role::kDecoder))
    return format("unknown sender role %u", static_cast<unsigned>(m.sender));
  if (carries_kv_slot(m.type) && m.kv_slot >= limits.kv_slots)
    return format("kv slot %u out of range (%u slots) in %.*s", static_cast<unsigned>(m.kv_slot),
                  static_cast<unsigned>(limits.kv_slots), static_cast<int>(type_str.size()),
                  type_str.data());
  if (carries_input_slot(m.type) && m.input_slot >= limits.input_slots)
    return format("input slot %u out of range (%u slots) in %.*s",
                  static_cast<unsigned>(m.input_slot), static_cast<unsigned>(limits.input_slots),
                  static_cast<int>(type_str.size()), type_str.data());
  if (carries_frame(m.type) && m.frame >= limits.max_frame)
    return format("frame %llu out of range (max %llu) in %.*s",
                  static_cast<unsigned long long>(m.frame),
                  static_cast<unsigned long long>(limits.max_frame),
                  static_cast<int>(type_str.size()), type_str.data());
  if (m.type == static_cast<uint16_t>(MsgType::kError) &&
      std::memchr(m.text, '\0', sizeof(m.text)) == nullptr)
    return "error text not NUL-terminated within 64 bytes";
  return {};
}

}  // namespace pi0::ipc
