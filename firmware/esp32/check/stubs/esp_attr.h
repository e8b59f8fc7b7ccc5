#pragma once
// On the device: _SECTION_ATTR_IMPL(".rtc_noinit", __COUNTER__).
#define RTC_NOINIT_ATTR
